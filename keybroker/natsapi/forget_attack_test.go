package natsapi_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/policy"
)

// TestAttackBrokerForgetsWithoutConsent: on NATS with Lethe's permissions, a malicious broker
// (the broker's NATS user, which may call every keybroker operation) asks the keybroker to
// forget tenant demo's guest, to destroy its key: with no statement, with one it signed itself
// as an admin or as the tenant, with one of tenant globex (naming demo's guest, or globex's own
// guest of the same name), and by replaying the statement demo signed for a forget already
// done, once the guest was adopted again. Each is refused, and the guest's key stays in Vault.
func TestAttackBrokerForgetsWithoutConsent(t *testing.T) {
	users := []natsauth.User{
		{Role: natsauth.RoleKeybroker, Password: "kb-pw"},
		{Role: natsauth.RoleBroker, Password: "broker-pw"},
	}
	var conf bytes.Buffer
	if err := natsauth.WriteServerConfig(&conf, natsauth.ServerConfig{Users: users}); err != nil {
		t.Fatal(err)
	}
	ns := natstest.Start(t, natstest.Options{Config: conf.String()})
	connect := func(role natsauth.Role, pw string) *nats.Conn {
		return ns.Connect(t, nats.UserInfo(string(role), pw), nats.CustomInboxPrefix(natsauth.InboxPrefix(role, "")))
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
	keys := map[string]ed25519.PrivateKey{}
	for _, tenant := range []string{"demo", "globex"} {
		pub, priv, _ := ed25519.GenerateKey(rand.Reader)
		keys[tenant] = priv
		if _, err := kb.RegisterTenant(ctx, &kbwire.AdminRequest{Signed: adminSigned(t, adminKey, kbwire.RegisterTenantRequest{Tenant: tenant, PolicyKey: pub})}); err != nil {
			t.Fatal(err)
		}
	}
	y, err := os.ReadFile("../../examples/policies/ci-emulated.yaml")
	if err != nil {
		t.Fatal(err)
	}
	env, err := policy.Sign("ci-emulated.yaml", y, keys["demo"])
	if err != nil {
		t.Fatal(err)
	}
	signedPolicy, err := env.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	adopt := func(id string) {
		t.Helper()
		n, err := kb.IssueNonce(ctx, kbwire.NonceRequest{MigrationID: id, Role: attest.RoleAdopt})
		if err != nil {
			t.Fatal(err)
		}
		k, err := seal.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		ev, err := attest.Produce(ctx, plats["source"], attest.Binding{MigrationID: id, Role: attest.RoleAdopt, Nonce: n.Nonce, HPKEPublicKey: k.PublicKey(), Statement: keybrokertest.CleanStatement(t)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kb.Adopt(ctx, &kbwire.AdoptRequest{AdoptionID: id, Tenant: "demo", VM: "web", Policy: signedPolicy, Agent: kbwire.Attestation{Nonce: n.Nonce, Evidence: ev}}); err != nil {
			t.Fatalf("adopting demo/web (%s): %v", id, err)
		}
	}
	keyThere := func() bool {
		t.Helper()
		s, err := srv.Client.Logical().ReadWithContext(ctx, "transit/keys/lethe-demo-web-e1")
		if err != nil {
			t.Fatal(err)
		}
		return s != nil
	}
	adopt("adopt-web-1")

	svc, err := natsapi.New(natsapi.Config{Conn: connect(natsauth.RoleKeybroker, "kb-pw"), Keybroker: kb, Logger: log})
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
	mallory := broker.NewKeyBrokerClient(connect(natsauth.RoleBroker, "broker-pw"), 0)

	sign := func(signer func(string, any, time.Time, time.Duration, ed25519.PrivateKey) ([]byte, error), key ed25519.PrivateKey, tenant string) []byte {
		t.Helper()
		b, err := signer(kbwire.OpGuestForget, kbwire.ForgetGuestRequest{Tenant: tenant, VM: "web", Reason: "mine"}, time.Now(), time.Minute, key)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	_, brokerKey, _ := ed25519.GenerateKey(rand.Reader)
	forged := map[string]struct {
		signed []byte
		want   error
	}{
		"no statement":                           {nil, kbwire.CodeUnauthorized},
		"signed by the broker as an admin":       {sign(kbwire.SignAdmin, brokerKey, "demo"), kbwire.CodeUnauthorized},
		"signed by the broker as the tenant":     {sign(kbwire.SignTenant, brokerKey, "demo"), kbwire.CodeUnauthorized},
		"signed by globex, naming demo's guest":  {sign(kbwire.SignTenant, keys["globex"], "demo"), kbwire.CodeUnauthorized},
		"signed by globex, naming its own guest": {sign(kbwire.SignTenant, keys["globex"], "globex"), kbwire.CodeInvalidRequest},
	}
	for name, tt := range forged {
		_, err := mallory.Forget(ctx, &kbwire.ForgetRequest{Tenant: "demo", VM: "web", Signed: tt.signed})
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", name, err, tt.want)
		}
		if !keyThere() {
			t.Fatalf("%s: the key of demo/web was destroyed", name)
		}
	}

	// demo forgets its guest (the broker carries its statement), adopts it again, and the
	// broker replays the statement.
	consent := sign(kbwire.SignTenant, keys["demo"], "demo")
	if _, err := mallory.Forget(ctx, &kbwire.ForgetRequest{Tenant: "demo", VM: "web", Signed: consent}); err != nil {
		t.Fatalf("the forget demo signed: %v", err)
	}
	if keyThere() {
		t.Fatal("the forget demo signed left its key")
	}
	adopt("adopt-web-2")
	if _, err := mallory.Forget(ctx, &kbwire.ForgetRequest{Tenant: "demo", VM: "web", Signed: consent}); !errors.Is(err, kbwire.CodeUnauthorized) {
		t.Errorf("replaying demo's statement: %v, want unauthorized", err)
	}
	if !keyThere() {
		t.Error("a replayed statement destroyed the key of the guest adopted again")
	}
}
