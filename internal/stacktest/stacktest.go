// Package stacktest starts Lethe's control plane inside a test process, for tests that add
// agents on top: a real NATS server with JetStream, a real Vault dev server, the keybroker
// behind its NATS service trusting one shared emulated SEV-SNP platform, a broker, and a
// tenant whose signed policy is applied. Every component stops when the test ends.
//
// It is for tests only: it uses emulated platforms and an admin key made for the stack.
package stacktest

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/policy"
)

// Options say what the stack's tenant and broker look like.
type Options struct {
	// Tenant is the tenant registered with the keybroker. Required.
	Tenant string
	// PolicyName and Policy are the tenant's policy file (YAML), signed with the tenant's key,
	// published to the keybroker and applied. Its spec.guests must cover the guests. Required.
	PolicyName string
	Policy     []byte
	// AgentTimeout bounds one broker call to an agent. Zero: the broker's default.
	AgentTimeout time.Duration
	// HostTTL is how old a host's heartbeat may be before the broker counts the host lost.
	// Zero: 30 s.
	HostTTL time.Duration
	// Logger receives every component's logs. Nil: none.
	Logger *slog.Logger
}

// Stack is a running control plane.
type Stack struct {
	NATS  *natstest.Server
	Vault *vaulttest.Server
	// EmulatorDir holds the shared emulated SEV-SNP platform, whose roots the keybroker
	// trusts; agents open it with their own chip ID and TCB (emulate.Open).
	EmulatorDir string
	// KeybrokerPub is the keybroker's receipt-signing public key.
	KeybrokerPub ed25519.PublicKey
	// Conn is the broker's connection; JS the JetStream context on it.
	Conn *nats.Conn
	JS   jetstream.JetStream
	// Tenant calls the broker as Options.Tenant; TenantKey is that tenant's policy key, which
	// signs what the tenant asks of the keybroker (a forget).
	Tenant    *broker.Client
	TenantKey ed25519.PrivateKey
}

// Start starts the stack and stops it when t ends. It fails t if anything cannot start.
func Start(t testing.TB, o Options) *Stack {
	t.Helper()
	ctx := t.Context()
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Stack{NATS: natstest.Start(t, natstest.Options{}), Vault: vaulttest.Start(t), EmulatorDir: t.TempDir()}
	if _, err := emulate.Open(s.EmulatorDir, attest.PlatformEmulatedSEVSNP, emulate.Options{}); err != nil {
		t.Fatal(err)
	}
	roots, err := attest.LoadRoots(s.EmulatorDir)
	if err != nil {
		t.Fatal(err)
	}
	verifier, err := attest.NewVerifier(attest.Config{Roots: roots})
	if err != nil {
		t.Fatal(err)
	}
	vc, err := vaulttest.NewClient(s.Vault.Addr, s.Vault.Token)
	if err != nil {
		t.Fatal(err)
	}
	adminPub, adminKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := keybroker.New(keybroker.Config{
		Vault: vc, Verifier: verifier, AdminKey: adminPub, StateDir: t.TempDir(),
		RetryInterval: 100 * time.Millisecond, Logger: log.With("component", "keybroker"),
	})
	if err != nil {
		t.Fatal(err)
	}
	_, tenantKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	register, err := kbwire.SignAdmin(kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{
		Tenant: o.Tenant, PolicyKey: tenantKey.Public().(ed25519.PublicKey),
	}, time.Now(), time.Minute, adminKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kb.RegisterTenant(ctx, &kbwire.AdminRequest{Signed: register}); err != nil {
		t.Fatalf("registering tenant: %v", err)
	}
	if s.KeybrokerPub, err = kb.PublicKey(ctx); err != nil {
		t.Fatal(err)
	}
	svc, err := natsapi.New(natsapi.Config{Conn: s.NATS.Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(natsauth.RoleKeybroker, ""))), Keybroker: kb, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	background(t, "keybroker", kb.Run)
	background(t, "keybroker service", svc.Run)

	// Every server answers only on its caller's inbox: each party connects with its own.
	s.Conn = s.NATS.Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(natsauth.RoleBroker, "")))
	b, err := broker.New(broker.Config{
		Conn: s.Conn, KeyBroker: broker.NewKeyBrokerClient(s.Conn, 0), Logger: log.With("component", "broker"),
		CheckInterval: 50 * time.Millisecond, AgentTimeout: o.AgentTimeout, HostTTL: cmp.Or(o.HostTTL, 30*time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	background(t, "broker", b.Run)
	select {
	case <-b.Ready():
	case <-time.After(time.Minute):
		t.Fatal("broker not ready within a minute")
	}
	if s.JS, err = jetstream.New(s.Conn); err != nil {
		t.Fatal(err)
	}
	s.TenantKey = tenantKey
	s.Tenant = broker.NewTenantClient(s.NATS.Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(natsauth.RoleTenant, o.Tenant))), o.Tenant)
	signed, err := policy.Sign(o.PolicyName, o.Policy, tenantKey)
	if err != nil {
		t.Fatal(err)
	}
	envelope, err := signed.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// As lethectl policy apply: published to the keybroker (the floor of its name), then applied.
	if _, err := kb.PublishPolicy(ctx, &kbwire.PublishPolicyRequest{Policy: envelope}); err != nil {
		t.Fatalf("publishing policy: %v", err)
	}
	if _, err := s.Tenant.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Envelope: envelope}); err != nil {
		t.Fatalf("applying policy: %v", err)
	}
	return s
}

// background runs f until t ends, and reports its error then.
func background(t testing.TB, name string, f func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: %v", name, err)
		}
	})
}

// WatchKV follows key in bucket until cond holds for its JSON value and returns that value; it
// fails t after limit, showing the last value seen.
func WatchKV[T any](t testing.TB, js jetstream.JetStream, bucket, key string, limit time.Duration, cond func(*T) bool) *T {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), limit)
	defer cancel()
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var last T
	for {
		select {
		case <-ctx.Done():
			b, _ := json.Marshal(last)
			t.Fatalf("%s/%s: condition not met within %v; last value %s", bucket, key, limit, b)
		case entry := <-w.Updates():
			if entry == nil || entry.Operation() != jetstream.KeyValuePut {
				continue
			}
			var v T
			if err := json.Unmarshal(entry.Value(), &v); err != nil {
				t.Fatal(err)
			}
			last = v
			if cond(&v) {
				return &v
			}
		}
	}
}
