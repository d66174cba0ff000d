package natsauth_test

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats-server/v2/server"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

var users = []natsauth.User{
	{Role: natsauth.RoleBroker, Password: "broker-pw"},
	{Role: natsauth.RoleBrokerStore, Password: "broker-store-pw"},
	{Role: natsauth.RoleKeybroker, Password: "keybroker-pw"},
	{Role: natsauth.RoleAgent, Name: "h1", Password: "h1-pw"},
	{Role: natsauth.RoleTenant, Name: "acme", Password: "acme-pw"},
	{Role: natsauth.RoleOperator, NKey: "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"},
	{Role: natsauth.RoleAuditor, Password: "auditor-pw"},
}

// TestServerConfigParses checks that nats-server accepts the configuration WriteServerConfig
// writes, with every user, and that one without users is refused outside development.
func TestServerConfigParses(t *testing.T) {
	var b bytes.Buffer
	if err := natsauth.WriteServerConfig(&b, natsauth.ServerConfig{}); !errors.Is(err, natsauth.ErrNoAuth) {
		t.Errorf("production config without users: %v, want ErrNoAuth", err)
	}
	b.Reset()
	if err := natsauth.WriteServerConfig(&b, natsauth.ServerConfig{Dev: true}); err != nil {
		t.Errorf("dev config without users: %v", err)
	}
	if err := new(server.Options).ProcessConfigString(b.String()); err != nil {
		t.Errorf("nats-server refuses the dev config: %v", err)
	}
	b.Reset()
	cfg := natsauth.ServerConfig{Users: users, Listen: "127.0.0.1:4333", TLS: &natsauth.ServerTLS{Cert: "c.pem", Key: "k.pem", CA: "ca.pem", Verify: true}}
	if err := natsauth.WriteServerConfig(&b, cfg); err != nil {
		t.Fatal(err)
	}
	o := new(server.Options)
	if err := o.ProcessConfigString(b.String()); err != nil {
		// The TLS files do not exist: parsing the rest must have gone through first.
		if !strings.Contains(err.Error(), "c.pem") {
			t.Fatalf("nats-server refuses the config: %v", err)
		}
		b.Reset()
		cfg.TLS = nil
		if err := natsauth.WriteServerConfig(&b, cfg); err != nil {
			t.Fatal(err)
		}
		o = new(server.Options)
		if err := o.ProcessConfigString(b.String()); err != nil {
			t.Fatalf("nats-server refuses the config: %v", err)
		}
	}
	if o.Port != 4333 || len(o.Users)+len(o.Nkeys) != len(users) {
		t.Errorf("options: port %d, %d users, %d nkeys; want 4333 and %d in all", o.Port, len(o.Users), len(o.Nkeys), len(users))
	}
}

func TestServerConfigRefuses(t *testing.T) {
	for name, u := range map[string]natsauth.User{
		"agent named with a wildcard": {Role: natsauth.RoleAgent, Name: "h1.>", Password: "x"},
		"tenant without a name":       {Role: natsauth.RoleTenant, Password: "x"},
		"unknown role":                {Role: "root", Password: "x"},
		"password and nkey":           {Role: natsauth.RoleBroker, Password: "x", NKey: "UABC"},
		"neither password nor nkey":   {Role: natsauth.RoleBroker},
		"account nkey":                {Role: natsauth.RoleBroker, NKey: "AABC"},
		"quote in password":           {Role: natsauth.RoleBroker, Password: `a"b`},
	} {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			if err := natsauth.WriteServerConfig(&b, natsauth.ServerConfig{Users: []natsauth.User{u}}); err == nil {
				t.Errorf("accepted:\n%s", b.String())
			}
		})
	}
}

func TestInboxPrefix(t *testing.T) {
	for _, tc := range []struct {
		role       natsauth.Role
		name, want string
	}{
		{natsauth.RoleBroker, "", "_INBOX.broker"},
		{natsauth.RoleBrokerStore, "", "_INBOX.broker-store"},
		{natsauth.RoleKeybroker, "", "_INBOX.keybroker"},
		{natsauth.RoleAgent, "h1", "_INBOX.agent.h1"},
		{natsauth.RoleTenant, "acme", "_INBOX.tenant.acme"},
		{natsauth.RoleOperator, "", "_INBOX.operator"},
		{natsauth.RoleOperator, "alice", "_INBOX.operator.alice"},
		{natsauth.RoleAuditor, "", "_INBOX.auditor"},
	} {
		if got := natsauth.InboxPrefix(tc.role, tc.name); got != tc.want {
			t.Errorf("InboxPrefix(%s, %q) = %q, want %q", tc.role, tc.name, got, tc.want)
		}
	}
	if !natsauth.ReplyAllowed("_INBOX.tenant.acme.x", natsauth.RoleTenant, "acme") {
		t.Error("a tenant's own inbox refused")
	}
	for _, reply := range []string{"_INBOX.tenant.acmex.y", "_INBOX.tenant.acme", "$JS.API.STREAM.DELETE.x"} {
		if natsauth.ReplyAllowed(reply, natsauth.RoleTenant, "acme") {
			t.Errorf("reply %q allowed to tenant acme", reply)
		}
	}
}

// TestKeybrokerSubjects checks that the keybroker subjects tenants and operators may call
// are those of its wire contract.
func TestKeybrokerSubjects(t *testing.T) {
	subject := func(op string) string { return kbwire.SubjectPrefix + "." + op }
	tenant, err := natsauth.UserPermissions(natsauth.User{Role: natsauth.RoleTenant, Name: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	logOps := kbwire.SubjectPrefix + ".log.>"
	for _, op := range []string{kbwire.OpLogCheckpoint, kbwire.OpLogConsistency, kbwire.OpLogHistory, kbwire.OpLogCosign, kbwire.OpLogEntries} {
		if !strings.HasPrefix(subject(op), strings.TrimSuffix(logOps, ">")) {
			t.Errorf("log operation %s is not under %s", op, logOps)
		}
	}
	want := []string{natsauth.BrokerSubjectPrefix + ".tenant.acme.>", subject(kbwire.OpPolicyPublish), subject(kbwire.OpTenantRotateKey), logOps, subject(kbwire.OpPublicKey)}
	if diff := cmp.Diff(want, tenant.Publish); diff != "" {
		t.Errorf("tenant's publish permissions (-want +got):\n%s", diff)
	}
	operator, err := natsauth.UserPermissions(natsauth.User{Role: natsauth.RoleOperator})
	if err != nil {
		t.Fatal(err)
	}
	want = []string{natsauth.BrokerSubjectPrefix + ".operator.>", subject(kbwire.OpTenantRegister), logOps, subject(kbwire.OpPublicKey)}
	if diff := cmp.Diff(want, operator.Publish); diff != "" {
		t.Errorf("operator's publish permissions (-want +got):\n%s", diff)
	}
}

// TestAuditorPermissions pins what an auditor may do: read stream LETHE_AUDIT through
// JetStream's API and receive on its own inbox; every other right is a change of this test.
// The broker and the keybroker each publish audit records under their own prefix only.
func TestAuditorPermissions(t *testing.T) {
	got, err := natsauth.UserPermissions(natsauth.User{Role: natsauth.RoleAuditor})
	if err != nil {
		t.Fatal(err)
	}
	want := natsauth.Permissions{
		Publish: []string{
			"$JS.LETHE.API.STREAM.INFO.LETHE_AUDIT",
			"$JS.LETHE.API.CONSUMER.CREATE.LETHE_AUDIT.>",
			"$JS.LETHE.API.CONSUMER.INFO.LETHE_AUDIT.>",
			"$JS.LETHE.API.CONSUMER.MSG.NEXT.LETHE_AUDIT.>",
			"$JS.LETHE.API.CONSUMER.DELETE.LETHE_AUDIT.>",
		},
		Subscribe: []string{"_INBOX.auditor.>"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("auditor's permissions (-want +got):\n%s", diff)
	}
	for role, own := range map[natsauth.Role]string{natsauth.RoleBroker: "lethe.v1.audit.broker.>", natsauth.RoleKeybroker: "lethe.v1.audit.keybroker.>"} {
		p, err := natsauth.UserPermissions(natsauth.User{Role: role})
		if err != nil {
			t.Fatal(err)
		}
		var audit []string
		for _, s := range p.Publish {
			if strings.HasPrefix(s, natsauth.AuditSubjectPrefix) {
				audit = append(audit, s)
			}
		}
		if diff := cmp.Diff([]string{own}, audit); diff != "" {
			t.Errorf("%s's audit subjects (-want +got):\n%s", role, diff)
		}
	}
}

// TestBucketPermissions pins who may write the broker's buckets: the broker's store user, and
// no one else, whatever their role.
func TestBucketPermissions(t *testing.T) {
	for _, u := range users {
		p, err := natsauth.UserPermissions(u)
		if err != nil {
			t.Fatal(err)
		}
		for _, bucket := range natsauth.Buckets {
			subject := "$KV." + bucket + ".>"
			if got, want := slices.Contains(p.Publish, subject), u.Role == natsauth.RoleBrokerStore; got != want {
				t.Errorf("%s may publish on %s: %t, want %t", u.Role, subject, got, want)
			}
		}
	}
}
