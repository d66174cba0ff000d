package natsapi_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// TestAttackLogHistoryConfinedToTenant (claim 3): on NATS with Lethe's permissions, tenant
// acme asks for the history of tenant globex's guest with its own inbox, with globex's inbox,
// and with the broker's and the operators' inboxes as reply subjects; nothing of the history
// reaches acme on any subject it may subscribe to, while globex reads it in its own inbox.
func TestAttackLogHistoryConfinedToTenant(t *testing.T) {
	users := []natsauth.User{
		{Role: natsauth.RoleKeybroker, Password: "kb-pw"},
		{Role: natsauth.RoleBroker, Password: "broker-pw"},
		{Role: natsauth.RoleOperator, Password: "operator-pw"},
		{Role: natsauth.RoleTenant, Name: "acme", Password: "acme-pw"},
		{Role: natsauth.RoleTenant, Name: "globex", Password: "globex-pw"},
	}
	var conf bytes.Buffer
	if err := natsauth.WriteServerConfig(&conf, natsauth.ServerConfig{Users: users}); err != nil {
		t.Fatal(err)
	}
	ns := natstest.Start(t, natstest.Options{Config: conf.String()})
	type conn struct {
		nc   *nats.Conn
		errs chan error
	}
	connect := func(role natsauth.Role, name, pw string) conn {
		login := string(role)
		if name != "" {
			login += "-" + name
		}
		c := conn{errs: make(chan error, 64)}
		c.nc = ns.Connect(t, nats.UserInfo(login, pw), nats.CustomInboxPrefix(natsauth.InboxPrefix(role, name)),
			nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
				select {
				case c.errs <- err:
				default:
				}
			}))
		return c
	}

	plats := keybrokertest.Platforms(t)
	srv := vaulttest.Start(t)
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	kb, err := keybroker.New(keybroker.Config{
		Vault: srv.Client, Verifier: keybrokertest.Verifier(t, plats), AdminKey: adminKey.Public().(ed25519.PublicKey),
		StateDir: t.TempDir(), RetryInterval: 10 * time.Millisecond, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for _, tenant := range []string{"acme", "globex"} {
		pub, _, _ := ed25519.GenerateKey(rand.Reader)
		if _, err := kb.RegisterTenant(ctx, &kbwire.AdminRequest{Signed: adminSigned(t, adminKey, kbwire.RegisterTenantRequest{Tenant: tenant, PolicyKey: pub})}); err != nil {
			t.Fatal(err)
		}
	}
	// globex's guest has a history: a refused release of it.
	if _, err := kb.Release(ctx, &kbwire.ReleaseRequest{MigrationID: "m-secret", Tenant: "globex", VM: "secret-vm"}); err == nil {
		t.Fatal("an empty release went through")
	}

	svc, err := natsapi.New(natsapi.Config{Conn: connect(natsauth.RoleKeybroker, "", "kb-pw").nc, Keybroker: kb, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	<-svc.Started()

	req, _ := json.Marshal(kbwire.LogHistoryRequest{Tenant: "globex", VM: "secret-vm"})
	entries := func(data []byte) int {
		var h tlog.History
		if json.Unmarshal(data, &h) != nil {
			return 0
		}
		return len(h.Entries)
	}

	// Everything acme may (and may not) subscribe to.
	acme := connect(natsauth.RoleTenant, "acme", "acme-pw")
	var mu sync.Mutex
	var leaked []string
	for _, subj := range []string{"_INBOX.tenant.acme.>", "_INBOX.tenant.globex.>", "_INBOX.broker.>", "_INBOX.operator.>", ">"} {
		if _, err := acme.nc.Subscribe(subj, func(m *nats.Msg) {
			if entries(m.Data) > 0 {
				mu.Lock()
				leaked = append(leaked, m.Subject)
				mu.Unlock()
			}
		}); err != nil {
			t.Fatal(err)
		}
	}
	// The owner and the broker listen where the answers may legitimately go.
	globex := connect(natsauth.RoleTenant, "globex", "globex-pw")
	broker := connect(natsauth.RoleBroker, "", "broker-pw")
	operator := connect(natsauth.RoleOperator, "", "operator-pw")
	answered := make(chan string, 8)
	for _, c := range []struct {
		nc   *nats.Conn
		subj string
	}{{globex.nc, "_INBOX.tenant.globex.stolen"}, {broker.nc, "_INBOX.broker.stolen"}, {operator.nc, "_INBOX.operator.stolen"}} {
		if _, err := c.nc.Subscribe(c.subj, func(m *nats.Msg) {
			if entries(m.Data) > 0 {
				answered <- m.Subject
			}
		}); err != nil {
			t.Fatal(err)
		}
		if err := c.nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}

	// With its own inbox: refused.
	msg, err := acme.nc.Request(natsapi.Subject(kbwire.OpLogHistory), req, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if entries(msg.Data) > 0 || msg.Header.Get("Nats-Service-Error-Code") == "" {
		t.Errorf("acme read globex's history with its own inbox: %s", msg.Data)
	}
	// Nor does its refusal tell acme whether the guest exists.
	other, _ := json.Marshal(kbwire.LogHistoryRequest{Tenant: "globex", VM: "no-such-vm"})
	msg2, err := acme.nc.Request(natsapi.Subject(kbwire.OpLogHistory), other, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	refusal := func(m *nats.Msg) string {
		return m.Header.Get("Nats-Service-Error-Code") + " " + m.Header.Get("Nats-Service-Error") + " " + string(m.Data)
	}
	if got, want := strings.ReplaceAll(refusal(msg), "secret-vm", "no-such-vm"), refusal(msg2); got != want {
		t.Errorf("acme's refusals differ for an existing guest (%q) and a missing one (%q)", got, want)
	}
	// With globex's, the broker's and an operator's inbox as its reply.
	for _, reply := range []string{"_INBOX.tenant.globex.stolen", "_INBOX.broker.stolen", "_INBOX.operator.stolen"} {
		if err := acme.nc.PublishRequest(natsapi.Subject(kbwire.OpLogHistory), reply, req); err != nil {
			t.Fatal(err)
		}
	}
	if err := acme.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// Each request is answered once, where its reply's owner reads it (so the requests were
	// handled): none was answered a second time, to acme.
	seen := map[string]bool{}
	deadline := time.After(10 * time.Second)
	for len(seen) < 3 {
		select {
		case s := <-answered:
			seen[s] = true
		case <-deadline:
			t.Fatalf("answers seen on %v: the requests were not handled, the test proves nothing", seen)
		}
	}
	if err := acme.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(leaked) > 0 {
		t.Errorf("globex's history reached acme on %v", leaked)
	}
}
