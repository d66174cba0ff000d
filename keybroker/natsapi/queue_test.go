package natsapi_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/nats-io/nats.go"
	"log/slog"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/policy"
)

// clock is a settable clock shared by the keybrokers of a test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// auditLog records one keybroker's audit events.
type auditLog struct {
	mu     sync.Mutex
	events []keybroker.Event
}

func (a *auditLog) Audit(_ context.Context, ev keybroker.Event) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.events = append(a.events, ev)
}

// decisions returns the decisions of the events of kind for migration id.
func (a *auditLog) decisions(kind keybroker.EventKind, id string) []keybroker.Decision {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []keybroker.Decision
	for _, ev := range a.events {
		if ev.Kind == kind && ev.MigrationID == id {
			out = append(out, ev.Decision)
		}
	}
	return out
}

// instance is one keybroker of the queue group, whose service the test starts and stops.
type instance struct {
	kb    *keybroker.Keybroker
	audit *auditLog
	ns    *natstest.Server
	log   *slog.Logger
}

// serve starts a service of in's keybroker in the queue group "lethe-keybroker" and returns a
// function that stops it: once that returns, the NATS server routes no more requests to it.
func (in *instance) serve(t *testing.T) (stop func()) {
	t.Helper()
	nc := in.ns.Connect(t)
	svc, err := natsapi.New(natsapi.Config{Conn: nc, Keybroker: in.kb, Logger: in.log, QueueGroup: "lethe-keybroker"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	select {
	case <-svc.Started():
	case err := <-done:
		cancel()
		t.Fatalf("service ended before it started: %v", err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("service Run: %v", err)
			}
			// The server has processed the unsubscriptions once it answers a ping.
			if err := nc.Flush(); err != nil {
				t.Errorf("flushing: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// newQueueEnv starts one Vault (behind a proxy the test can cut), one NATS server and two
// keybrokers on them with a shared clock, whose Run goes on for the whole test; no service is
// started. The env's clients talk to whichever instances serve.
func newQueueEnv(t *testing.T) (*env, [2]*instance, *clock, *vaulttest.Server) {
	t.Helper()
	plats := keybrokertest.Platforms(t)
	v := keybrokertest.Verifier(t, plats)
	srv := vaulttest.Start(t)
	px := srv.Proxy(t)
	ns := natstest.Start(t, natstest.Options{})
	clk := &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	var insts [2]*instance
	ctx, cancel := context.WithCancel(context.Background())
	errs := make(chan error, len(insts))
	for i := range insts {
		vc, err := vaulttest.NewClient(px.Addr, srv.Token)
		if err != nil {
			t.Fatal(err)
		}
		in := &instance{audit: &auditLog{}, ns: ns, log: log}
		in.kb, err = keybroker.New(keybroker.Config{
			Vault: vc, Verifier: v, AdminKey: adminKey.Public().(ed25519.PublicKey), StateDir: t.TempDir(), Audit: in.audit,
			RetryInterval: 10 * time.Millisecond, Logger: log, Now: clk.Now,
		})
		if err != nil {
			t.Fatal(err)
		}
		go func() { errs <- in.kb.Run(ctx) }()
		insts[i] = in
	}
	t.Cleanup(func() {
		cancel()
		for range insts {
			if err := <-errs; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	})
	// The keybroker answers only on its callers' inboxes: the broker's, the operators'.
	nc := ns.Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(natsauth.RoleBroker, "")))
	e := &env{
		t: t, proxy: px, nc: nc, plats: plats,
		kbc:    broker.NewKeyBrokerClient(nc, 0),
		client: kbclient.New(nc, 0),
	}
	var pub ed25519.PublicKey
	pub, e.tenantKey, _ = ed25519.GenerateKey(rand.Reader)
	if _, err := insts[0].kb.RegisterTenant(t.Context(), &kbwire.AdminRequest{Signed: adminSignedAt(t, adminKey, kbwire.RegisterTenantRequest{Tenant: "demo", PolicyKey: pub}, clk.Now())}); err != nil {
		t.Fatalf("registering tenant: %v", err)
	}
	y, err := os.ReadFile("../../examples/policies/ci-emulated.yaml")
	if err != nil {
		t.Fatal(err)
	}
	signed, err := policy.Sign("ci-emulated.yaml", y, e.tenantKey)
	if err != nil {
		t.Fatal(err)
	}
	if e.policy, err = signed.Marshal(); err != nil {
		t.Fatal(err)
	}
	return e, insts, clk, srv
}

// TestQueueGroup runs two keybrokers behind the queue group on one NATS and one Vault: a
// nonce issued by one is consumed by the other, once; racing consumers have one winner;
// expiry holds across instances; and with Vault down a release is refused, nothing released.
func TestQueueGroup(t *testing.T) {
	e, insts, clk, srv := newQueueEnv(t)
	a, b := insts[0], insts[1]
	ctx := t.Context()

	stopA := a.serve(t)
	e.adopt("vm1")
	e.adopt("vm2")

	// The nonces come from a alone, the release goes to b alone.
	m1 := e.newMigration("m1", "vm1", "destination")
	stopB := b.serve(t)
	stopA()
	if _, err := e.kbc.Release(ctx, m1.req); err != nil {
		t.Fatalf("Release on the keybroker that did not issue the nonces: %v", err)
	}
	// b consumed them; a refuses them as used.
	a.serve(t) // stopped at cleanup
	stopB()
	_, err := e.kbc.Release(ctx, m1.req)
	if code(err) != "nonce_used" {
		t.Errorf("replay on the other keybroker = %v, want nonce_used", err)
	}
	got := map[string][]keybroker.Decision{
		"a": a.audit.decisions(keybroker.EventRelease, "m1"),
		"b": b.audit.decisions(keybroker.EventRelease, "m1"),
	}
	want := map[string][]keybroker.Decision{"a": {keybroker.DecisionDeny}, "b": {keybroker.DecisionAllow}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("release decisions per keybroker (-want +got):\n%s", diff)
	}

	// From here on both serve, and either may answer any request.
	b.serve(t)

	// Racing adoptions with one nonce: exactly one wins.
	ag := e.attest("source", "adopt-vm3", attest.RoleAdopt, keybrokertest.CleanStatement(t))
	req := &kbwire.AdoptRequest{AdoptionID: "adopt-vm3", Tenant: "demo", VM: "vm3", Policy: e.policy, Agent: ag.att}
	codes := make([]string, 4)
	var wg sync.WaitGroup
	for i := range codes {
		wg.Go(func() {
			_, err := e.kbc.Adopt(ctx, req)
			codes[i] = code(err)
		})
	}
	wg.Wait()
	slices.Sort(codes)
	if diff := cmp.Diff([]string{"", "nonce_used", "nonce_used", "nonce_used"}, codes); diff != "" {
		t.Errorf("racing adoptions' codes (-want +got):\n%s", diff)
	}

	// Expiry, whichever keybroker issued and whichever consumes.
	m2 := e.newMigration("m2", "vm2", "destination")
	clk.Advance(61 * time.Second)
	if _, err := e.kbc.Release(ctx, m2.req); code(err) != "nonce_expired" {
		t.Errorf("Release after the TTL = %v, want nonce_expired", err)
	}

	// Vault down: nonces are still issued (no Vault round trip), but no release goes through.
	keys := func() []string {
		t.Helper()
		s, err := srv.Client.Logical().ListWithContext(ctx, "transit/keys")
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, k := range s.Data["keys"].([]any) {
			out = append(out, k.(string))
		}
		return out
	}
	before := keys()
	e.proxy.Cut()
	m3 := e.newMigration("m3", "vm2", "destination")
	_, err = e.kbc.Release(ctx, m3.req)
	e.proxy.Restore()
	if code(err) != "unavailable" || !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("Release with Vault down = %v, want unavailable", err)
	}
	if diff := cmp.Diff(before, keys()); diff != "" {
		t.Errorf("a release refused for want of Vault changed its keys (-before +after):\n%s", diff)
	}
	s, err := srv.Client.KVv2(vaulttest.KVMount).Get(ctx, "guests/demo/vm2")
	if err != nil {
		t.Fatal(err)
	}
	if m, ok := s.Data["migration"]; ok && m != nil {
		t.Errorf("vm2 has a migration after the refused release: %v", m)
	}
	var decided []keybroker.Decision
	for _, in := range insts {
		decided = append(decided, in.audit.decisions(keybroker.EventRelease, "m3")...)
	}
	if diff := cmp.Diff([]keybroker.Decision{keybroker.DecisionError}, decided); diff != "" {
		t.Errorf("audit of the refused release (-want +got):\n%s", diff)
	}
}
