package broker_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/nats-io/nats.go"
)

var authUsers = []natsauth.User{
	{Role: natsauth.RoleBroker, Password: "broker-pw"},
	{Role: natsauth.RoleBrokerStore, Password: "broker-store-pw"},
	{Role: natsauth.RoleKeybroker, Password: "keybroker-pw"},
	{Role: natsauth.RoleAgent, Name: "h1", Password: "h1-pw"},
	{Role: natsauth.RoleAgent, Name: "h2", Password: "h2-pw"},
	{Role: natsauth.RoleTenant, Name: "acme", Password: "acme-pw"},
	{Role: natsauth.RoleTenant, Name: "globex", Password: "globex-pw"},
	{Role: natsauth.RoleOperator, Password: "operator-pw"},
	{Role: natsauth.RoleAuditor, Password: "auditor-pw"},
}

// login returns the user name WriteServerConfig gives a user of role and name.
func login(role natsauth.Role, name string) string {
	if name == "" {
		return string(role)
	}
	return string(role) + "-" + name
}

// authEnv starts a server with Lethe's permissions and makes env connect as the right users.
func authEnv(t *testing.T) *env {
	t.Helper()
	var conf bytes.Buffer
	if err := natsauth.WriteServerConfig(&conf, natsauth.ServerConfig{Users: authUsers}); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, natstest.Options{Config: conf.String()})
	e.connect = func(role natsauth.Role, name string) *nats.Conn {
		nc, _ := connectAs(t, e, role, name)
		return nc
	}
	return e
}

// connectAs connects as the user of role and name and returns the connection and a channel of
// its asynchronous errors (permission violations).
func connectAs(t *testing.T, e *env, role natsauth.Role, name string) (*nats.Conn, <-chan error) {
	t.Helper()
	for _, u := range authUsers {
		if u.Role != role || u.Name != name {
			continue
		}
		user := login(role, name)
		errs := make(chan error, 16)
		nc := e.srv.Connect(t,
			nats.UserInfo(user, u.Password),
			nats.CustomInboxPrefix(natsauth.InboxPrefix(role, name)),
			nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
				select {
				case errs <- err:
				default:
				}
			}))
		return nc, errs
	}
	t.Fatalf("no user of role %s name %q", role, name)
	return nil, nil
}

func TestAuthHappyPathAndDenials(t *testing.T) {
	e := authEnv(t)
	e.standard()
	e.agents["h1"].AutoCommit = true
	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("under authentication: phase %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	// Through its own subjects, another tenant finds nothing.
	if _, err := e.tenant("globex").GetMigration(t.Context(), id); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("globex reading acme's migration: %v, want ErrNotFound", err)
	}

	tests := map[string]struct {
		role    natsauth.Role
		name    string
		sub     bool
		subject string
	}{
		"tenant reads another tenant's migration": {role: natsauth.RoleTenant, name: "globex", subject: broker.TenantSubject("acme", broker.OpMigrationsGet)},
		"tenant reads the migrations bucket":      {role: natsauth.RoleTenant, name: "globex", subject: "$JS.API.DIRECT.GET.KV_lethe-migrations." + id},
		"tenant listens to other inboxes":         {role: natsauth.RoleTenant, name: "globex", sub: true, subject: "_INBOX.>"},
		"tenant calls an agent":                   {role: natsauth.RoleTenant, name: "globex", subject: "lethe.v1.agent.h1.keys"},
		"tenant reads events":                     {role: natsauth.RoleTenant, name: "globex", sub: true, subject: "lethe.v1.events.>"},
		"agent reports progress as another host":  {role: natsauth.RoleAgent, name: "h1", subject: "lethe.v1.agent.h2.progress." + id},
		"agent registers as another host":         {role: natsauth.RoleAgent, name: "h1", subject: "$KV.lethe-hosts.h2"},
		"agent serves another host's requests":    {role: natsauth.RoleAgent, name: "h1", sub: true, subject: "lethe.v1.agent.h2.>"},
		"agent calls the keybroker":               {role: natsauth.RoleAgent, name: "h1", subject: "lethe.v1.keybroker.release"},
		"agent calls the broker as operator":      {role: natsauth.RoleAgent, name: "h1", subject: broker.OperatorSubject(broker.OpMigrationsAbort)},
		"operator calls an agent":                 {role: natsauth.RoleOperator, subject: "lethe.v1.agent.h1.keys"},
		"operator calls the keybroker":            {role: natsauth.RoleOperator, subject: "lethe.v1.keybroker.destroy"},
		"keybroker calls an agent":                {role: natsauth.RoleKeybroker, subject: "lethe.v1.agent.h1.abort"},
		"keybroker forges progress":               {role: natsauth.RoleKeybroker, subject: "lethe.v1.agent.h1.progress." + id},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			nc, errs := connectAs(t, e, tc.role, tc.name)
			if tc.sub {
				if _, err := nc.SubscribeSync(tc.subject); err != nil {
					t.Fatal(err)
				}
			} else if err := nc.Publish(tc.subject, []byte(`{}`)); err != nil {
				t.Fatal(err)
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-errs:
				if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), tc.subject) {
					t.Errorf("got %v, want a permission violation on %s", err, tc.subject)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("no permission violation for %s", tc.subject)
			}
		})
	}

	t.Run("no credentials", func(t *testing.T) {
		if nc, err := nats.Connect(e.srv.URL); err == nil {
			nc.Close()
			t.Error("connected without credentials")
		}
	})
}
