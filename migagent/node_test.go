package migagent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha512"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/stacktest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

const (
	testTenant = "demo"
	testVM     = "web"
	adminToken = "node-test-admin-token"
	// waitLimit bounds every wait for an event.
	waitLimit = 90 * time.Second
)

// env is a real NATS server, a real Vault, the real keybroker behind its NATS edge, a real
// broker, and agents (Nodes) in this process on emulated SEV-SNP platforms sharing one
// emulator directory.
type env struct {
	t      *testing.T
	nats   *natstest.Server
	vault  *vaulttest.Server
	kbPub  ed25519.PublicKey
	tenant *broker.Client
	// tenantKey is the tenant's policy key.
	tenantKey ed25519.PrivateKey
	agents    *agentapi.Client
	js        jetstream.JetStream
	emuDir    string
	log       *slog.Logger
	nodes     map[string]*testNode
	// heartbeat is the agents' heartbeat interval.
	heartbeat time.Duration
}

type testNode struct {
	n      *Node
	cancel context.CancelFunc
	done   chan error
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvHostTTL(t, 0)
}

// newEnvHostTTL is newEnv with a broker that counts a host lost after ttl without a
// heartbeat (zero: the broker's default).
func newEnvHostTTL(t *testing.T, ttl time.Duration) *env {
	t.Helper()
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	y, err := os.ReadFile("../examples/policies/ci-emulated.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s := stacktest.Start(t, stacktest.Options{
		Tenant: testTenant, PolicyName: "ci-emulated.yaml", Policy: y, AgentTimeout: 20 * time.Second, HostTTL: ttl, Logger: log,
	})
	return &env{
		t: t, nats: s.NATS, vault: s.Vault, kbPub: s.KeybrokerPub, tenant: s.Tenant, tenantKey: s.TenantKey,
		agents: agentapi.NewClient(s.Conn, 0), js: s.JS, emuDir: s.EmulatorDir, log: log,
		nodes: map[string]*testNode{}, heartbeat: 500 * time.Millisecond,
	}
}

// startNode starts an agent for host on the shared emulator with its own chip ID and tcb.
func (e *env) startNode(host string, tcb attest.SNPTCB, guests ...GuestSpec) *testNode {
	e.t.Helper()
	chip := sha512.Sum512([]byte(host))
	plat, err := emulate.Open(e.emuDir, attest.PlatformEmulatedSEVSNP, emulate.Options{TCB: &tcb, ChipID: chip[:]})
	if err != nil {
		e.t.Fatal(err)
	}
	n, err := New(Config{
		Host: host, Conn: e.nats.Connect(e.t), Attester: plat, KeybrokerKey: e.kbPub, Labels: map[string]string{"zone": "test"},
		Region: "eu", Guests: guests, WorkloadRate: 5000, HeartbeatInterval: e.heartbeat,
		Logger: e.log.With("node", host),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tn := &testNode{n: n, cancel: cancel, done: make(chan error, 1)}
	go func() { tn.done <- n.Run(ctx) }()
	e.t.Cleanup(func() { tn.stop(e.t) })
	e.nodes[host] = tn
	return tn
}

// stop stops the node and waits for Run to return.
func (tn *testNode) stop(t *testing.T) {
	tn.cancel()
	select {
	case err, ok := <-tn.done:
		if ok && err != nil {
			t.Errorf("node: %v", err)
		}
		if ok {
			close(tn.done)
		}
	case <-time.After(waitLimit):
		t.Error("node did not stop")
	}
}

// watch follows key in bucket until cond holds for its JSON value, and fails the test after
// waitLimit.
func watch[T any](e *env, bucket, key string, cond func(*T) bool) *T {
	e.t.Helper()
	return stacktest.WatchKV(e.t, e.js, bucket, key, waitLimit, cond)
}

func (e *env) waitHost(host string, cond func(*agentapi.HostRecord) bool) {
	e.t.Helper()
	watch(e, agentapi.HostsBucket, host, cond)
}

func hasGuest(want bool) func(*agentapi.HostRecord) bool {
	return func(r *agentapi.HostRecord) bool { return (r.Guest(testTenant, testVM) != nil) == want }
}

// migrate asks for a migration of the guest to dst and returns its id.
func (e *env) migrate(dst string) string {
	e.t.Helper()
	resp, err := e.tenant.CreateMigration(e.t.Context(), &broker.CreateMigrationRequest{VM: testVM, Destination: dst})
	if err != nil {
		e.t.Fatalf("migrating to %s: %v", dst, err)
	}
	return resp.Migration.ID
}

func (e *env) waitEnd(id string) *broker.Migration {
	e.t.Helper()
	return watch(e, broker.MigrationsBucket, id, func(m *broker.Migration) bool { return m.Phase.Terminal() })
}

// receipt fetches and verifies a migration's receipt with the keybroker's public key.
func (e *env) receipt(id string) *receipt.Receipt {
	e.t.Helper()
	r, err := e.tenant.GetReceipt(e.t.Context(), id)
	if err != nil {
		e.t.Fatalf("getting receipt of %s: %v", id, err)
	}
	envl, err := receipt.Parse(r.Envelope)
	if err != nil {
		e.t.Fatal(err)
	}
	rc, err := receipt.Verify(envl, e.kbPub)
	if err != nil {
		e.t.Fatalf("verifying receipt of %s: %v", id, err)
	}
	return rc
}

// transitKeys reports which of names exist in Vault, read straight from Vault.
func (e *env) transitKeys(names ...string) map[string]bool {
	e.t.Helper()
	out := map[string]bool{}
	for _, name := range names {
		s, err := e.vault.Client.Logical().ReadWithContext(e.t.Context(), "transit/keys/"+name)
		if err != nil {
			e.t.Fatal(err)
		}
		out[name] = s != nil
	}
	return out
}

// guestRunning waits until the guest on tn writes memory, and fails after waitLimit.
func guestRunning(t *testing.T, tn *testNode) {
	t.Helper()
	tn.n.mu.Lock()
	g := tn.n.guests[guestKey(testTenant, testVM)]
	tn.n.mu.Unlock()
	if g == nil {
		t.Fatalf("guest not on %s", tn.n.cfg.Host)
	}
	before := g.workload.Written()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(waitLimit)
	for g.workload.Written() == before {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("guest on %s does not run", tn.n.cfg.Host)
		}
	}
}

// gate passes the source's data-plane writes until limit bytes went through, then holds them
// until it is opened.
type gate struct {
	mu      sync.Mutex
	written int
	limit   int
	reached chan struct{}
	open    chan struct{}
	once    sync.Once
}

func newGate(limit int) *gate {
	return &gate{limit: limit, reached: make(chan struct{}), open: make(chan struct{})}
}

func (g *gate) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &gatedConn{Conn: c, g: g}, nil
}

type gatedConn struct {
	net.Conn
	g *gate
}

func (c *gatedConn) Write(b []byte) (int, error) {
	c.g.mu.Lock()
	c.g.written += len(b)
	held := c.g.written > c.g.limit
	c.g.mu.Unlock()
	if held {
		c.g.once.Do(func() { close(c.g.reached) })
		<-c.g.open
	}
	return c.Conn.Write(b)
}

func setDial(n *Node, dial func(context.Context, string, string) (net.Conn, error)) {
	n.mu.Lock()
	n.dial = dial
	n.mu.Unlock()
}

func TestMigrations(t *testing.T) {
	e := newEnv(t)
	base := attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 115}
	a := e.startNode("host-a", base, GuestSpec{Tenant: testTenant, VM: testVM, MemoryBytes: 64 << 20})
	b := e.startNode("host-b", attest.SNPTCB{BootLoader: 4, TEE: 0, SNP: 9, Microcode: 120})
	c := e.startNode("host-c", base)
	e.startNode("host-weak", attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 100})
	for _, h := range []string{"host-b", "host-c", "host-weak"} {
		e.waitHost(h, func(*agentapi.HostRecord) bool { return true })
	}
	e.waitHost("host-a", hasGuest(true))

	g, err := e.tenant.AdoptGuest(t.Context(), &broker.AdoptGuestRequest{VM: testVM, Host: "host-a"})
	if err != nil {
		t.Fatalf("adopting: %v", err)
	}
	if g.Epoch != 1 || g.Host != "host-a" {
		t.Fatalf("adopted guest: %+v", g)
	}
	a.n.mu.Lock()
	held := a.n.guests[guestKey(testTenant, testVM)].mdk != nil
	a.n.mu.Unlock()
	if !held {
		t.Fatal("host-a holds no MDK after adoption")
	}
	epoch1, epoch2 := "lethe-demo-web-e1", "lethe-demo-web-e2"

	t.Run("key reissued to an agent that lost it", func(t *testing.T) {
		a.n.mu.Lock()
		g := a.n.guests[guestKey(testTenant, testVM)]
		g.mdk.Destroy()
		g.mdk = nil
		a.n.mu.Unlock()
		again, err := e.tenant.AdoptGuest(t.Context(), &broker.AdoptGuestRequest{VM: testVM, Host: "host-a"})
		if err != nil {
			t.Fatalf("adopting again on host-a: %v", err)
		}
		if again.Epoch != 1 || again.Host != "host-a" {
			t.Fatalf("guest after reissue: %+v, want host-a at epoch 1", again)
		}
		a.n.mu.Lock()
		g = a.n.guests[guestKey(testTenant, testVM)]
		held, epoch := g.mdk != nil, g.epoch
		a.n.mu.Unlock()
		if !held || epoch != 1 {
			t.Fatalf("host-a holds MDK %v at epoch %d after the reissue, want the epoch-1 key", held, epoch)
		}
	})

	t.Run("weak destination is denied", func(t *testing.T) {
		id := e.migrate("host-weak")
		m := e.waitEnd(id)
		if m.Phase != broker.PhaseAborted || !strings.Contains(m.AbortReason, "denied") || !strings.Contains(m.AbortReason, "microcode") {
			t.Fatalf("migration to the weak host: phase %s, reason %q; want Aborted, denied naming the microcode", m.Phase, m.AbortReason)
		}
		t.Logf("denial: %s", m.AbortReason)
		e.waitHost("host-a", hasGuest(true))
		guestRunning(t, a)
	})

	t.Run("destination stopped mid-transfer", func(t *testing.T) {
		gt := newGate(8 << 20)
		setDial(a.n, gt.dial)
		defer setDial(a.n, nil)
		id := e.migrate("host-c")
		select {
		case <-gt.reached:
		case <-time.After(waitLimit):
			t.Fatal("transfer did not start")
		}
		c.stop(t)
		close(gt.open)
		m := e.waitEnd(id)
		if m.Phase != broker.PhaseAborted {
			t.Fatalf("phase %s, want Aborted", m.Phase)
		}
		t.Logf("abort reason: %s", m.AbortReason)
		e.waitHost("host-a", hasGuest(true))
		guestRunning(t, a)
		a.n.mu.Lock()
		ga := a.n.guests[guestKey(testTenant, testVM)]
		busy, mdk := ga.migration, ga.mdk
		a.n.mu.Unlock()
		if busy != "" || mdk == nil || mdk.Destroyed() {
			t.Errorf("source guest after abort: migration %q, MDK held %v", busy, mdk != nil && !mdk.Destroyed())
		}
		c.n.mu.Lock()
		cm := c.n.migs[id]
		c.n.mu.Unlock()
		erased := cm != nil
		if erased {
			cm.mu.Lock()
			erased = cm.phase() == phaseAborted && cm.keys.empty() && cm.region == nil
			cm.mu.Unlock()
		}
		if !erased {
			t.Error("the stopped destination kept keys or memory of the migration")
		}
		want := map[string]bool{"lethe-mig-" + id: false, epoch2: false, epoch1: true}
		if diff := cmp.Diff(want, e.transitKeys("lethe-mig-"+id, epoch2, epoch1)); diff != "" {
			t.Errorf("Vault keys (-want +got):\n%s", diff)
		}
		// The stopped destination cannot attest that it erased and never resumed the guest.
		if rc := e.receipt(id); rc.Outcome != receipt.OutcomeAbortedUnverifiedErasure {
			t.Errorf("receipt outcome %s, want %s", rc.Outcome, receipt.OutcomeAbortedUnverifiedErasure)
		}
	})

	t.Run("live migration to B", func(t *testing.T) {
		id := e.migrate("host-b")
		m := e.waitEnd(id)
		if m.Phase != broker.PhaseErased {
			t.Fatalf("phase %s (reason %q, notes %q), want Erased", m.Phase, m.AbortReason, m.Notes)
		}
		if m.Progress == nil || len(m.Progress.MemoryDigest) != 32 {
			t.Fatalf("no memory digest in the migration record: %+v", m.Progress)
		}
		st, err := e.agents.Status(t.Context(), "host-b", &agentapi.StatusRequest{MigrationID: id})
		if err != nil {
			t.Fatal(err)
		}
		if st.Transfer == nil || !bytes.Equal(st.Transfer.MemoryDigest, m.Progress.MemoryDigest) {
			t.Fatalf("memory digests differ: source %x, destination %+v", m.Progress.MemoryDigest, st.Transfer)
		}
		t.Logf("memory digest %s after %d rounds", m.Progress.MemoryDigest, m.Progress.Round)
		// The source measured the pause and reported its rounds, the final one last.
		if m.Downtime <= 0 || m.DowntimeSource != agentapi.DowntimeAgent {
			t.Errorf("downtime %v measured by %q, want a positive one by the agent", m.Downtime, m.DowntimeSource)
		}
		if n := len(m.Rounds); n != m.Progress.Round || n == 0 || !m.Rounds[n-1].Final || m.Rounds[0].Pages == 0 {
			t.Errorf("rounds %+v, want %d ending with the final one", m.Rounds, m.Progress.Round)
		}
		t.Logf("downtime %v (agent's measurement, an upper bound)", m.Downtime)
		if rc := e.receipt(id); rc.Outcome != receipt.OutcomeErased {
			t.Errorf("receipt outcome %s, want erased", rc.Outcome)
		}
		want := map[string]bool{"lethe-mig-" + id: false, epoch1: false, epoch2: true}
		if diff := cmp.Diff(want, e.transitKeys("lethe-mig-"+id, epoch1, epoch2)); diff != "" {
			t.Errorf("Vault keys (-want +got):\n%s", diff)
		}
		e.waitHost("host-b", hasGuest(true))
		e.waitHost("host-a", hasGuest(false))
		guestRunning(t, b)
		b.n.mu.Lock()
		gb := b.n.guests[guestKey(testTenant, testVM)]
		epoch := gb.epoch
		b.n.mu.Unlock()
		if epoch != 2 {
			t.Errorf("guest on host-b in epoch %d, want 2", epoch)
		}
		a.n.mu.Lock()
		am := a.n.migs[id]
		clean := a.n.guests[guestKey(testTenant, testVM)] == nil
		a.n.mu.Unlock()
		am.mu.Lock()
		clean = clean && am.keys.empty() && am.erased && am.phase() == phaseCommitted
		am.mu.Unlock()
		if !clean {
			t.Error("host-a kept the guest or a key after the commit")
		}
		guests, err := e.tenant.ListGuests(t.Context(), &broker.ListGuestsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(guests.Guests) != 1 || guests.Guests[0].Host != "host-b" || guests.Guests[0].Epoch != 2 {
			t.Errorf("guests: %+v", guests.Guests)
		}
	})
}

func TestParseGuestSpec(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    GuestSpec
		wantErr bool
	}{
		"MiB":        {in: "acme/web=256MiB", want: GuestSpec{Tenant: "acme", VM: "web", MemoryBytes: 256 << 20}},
		"bytes":      {in: "acme/db=65536", want: GuestSpec{Tenant: "acme", VM: "db", MemoryBytes: 65536}},
		"file":       {in: "acme/web=file:/var/lib/ram", want: GuestSpec{Tenant: "acme", VM: "web", File: "/var/lib/ram"}},
		"no size":    {in: "acme/web", wantErr: true},
		"no tenant":  {in: "web=1MiB", wantErr: true},
		"bad name":   {in: "ac.me/web=1MiB", wantErr: true},
		"not paged":  {in: "acme/web=1000", wantErr: true},
		"zero":       {in: "acme/web=0MiB", wantErr: true},
		"bad suffix": {in: "acme/web=1MB", wantErr: true},
		"empty file": {in: "acme/web=file:", wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseGuestSpec(tc.in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	plat, err := emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	nc := natstest.Start(t, natstest.Options{}).Connect(t)
	kbKey, _, _ := ed25519.GenerateKey(nil)
	tests := map[string]Config{
		"no conn":          {Host: "h", Attester: plat, KeybrokerKey: kbKey},
		"no keybroker key": {Host: "h", Conn: nc, Attester: plat},
		"bad host":         {Host: "h.1", Conn: nc, Attester: plat, KeybrokerKey: kbKey},
		"wildcard listen":  {Host: "h", Conn: nc, Attester: plat, KeybrokerKey: kbKey, DataListen: "0.0.0.0:0"},
		"duplicate guests": {Host: "h", Conn: nc, Attester: plat, KeybrokerKey: kbKey, Guests: []GuestSpec{{Tenant: "t", VM: "v", MemoryBytes: 4096}, {Tenant: "t", VM: "v", MemoryBytes: 4096}}},
	}
	for name, cfg := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := New(cfg); err == nil {
				t.Error("New accepted the config")
			}
		})
	}
	if _, err := New(Config{Host: "h", Conn: nc, Attester: plat, KeybrokerKey: kbKey, DataListen: "0.0.0.0:0", DataAdvertise: "10.0.0.1"}); err != nil {
		t.Errorf("wildcard listen with an advertised host: %v", err)
	}
}
