package broker_test

import (
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/agentapi/agentapitest"
)

// recordingMetrics is a broker.Metrics that records what it is given.
type recordingMetrics struct {
	mu          sync.Mutex
	transitions [][2]broker.Phase
	handshakes  []time.Duration
	unfinished  []map[broker.Phase]int
	natsErrors  []string
	downtimes   []time.Duration
	finished    chan broker.Phase // receives each terminal phase entered
}

func newRecordingMetrics() *recordingMetrics {
	return &recordingMetrics{finished: make(chan broker.Phase, 16)}
}

func (r *recordingMetrics) PhaseChanged(from, to broker.Phase, inFrom time.Duration) {
	r.mu.Lock()
	r.transitions = append(r.transitions, [2]broker.Phase{from, to})
	r.mu.Unlock()
	if to.Terminal() {
		r.finished <- to
	}
}

func (r *recordingMetrics) FleetGuest(string, string, time.Duration) {}
func (r *recordingMetrics) FleetQueue(int, int)                      {}

func (r *recordingMetrics) Handshake(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.handshakes = append(r.handshakes, d)
}

func (r *recordingMetrics) Unfinished(byPhase map[broker.Phase]int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unfinished = append(r.unfinished, byPhase)
}

func (r *recordingMetrics) Downtime(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.downtimes = append(r.downtimes, d)
}

func (r *recordingMetrics) NATSError(op string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.natsErrors = append(r.natsErrors, op)
}

func TestMetricsHooks(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	rec := newRecordingMetrics()
	e.cfg.Metrics = rec
	e.standard()
	e.agents["h1"].AutoCommit = true

	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	if p := <-rec.finished; p != broker.PhaseErased {
		t.Fatalf("migration %s finished %s, want Erased", resp.Migration.ID, p)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	want := [][2]broker.Phase{
		{broker.PhaseRequested, broker.PhaseAttesting},
		{broker.PhaseAttesting, broker.PhaseKeysReleased},
		{broker.PhaseKeysReleased, broker.PhaseTransferring},
		{broker.PhaseTransferring, broker.PhaseCuttingOver},
		{broker.PhaseCuttingOver, broker.PhaseCommitted},
		{broker.PhaseCommitted, broker.PhaseErased},
	}
	if diff := cmp.Diff(want, rec.transitions); diff != "" {
		t.Errorf("transitions (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]time.Duration{agentapitest.FakeDowntime}, rec.downtimes); diff != "" {
		t.Errorf("downtimes (-want +got):\n%s", diff)
	}
	if len(rec.handshakes) != 1 {
		t.Errorf("handshakes = %v, want one", rec.handshakes)
	}
	if len(rec.unfinished) == 0 {
		t.Error("the unfinished migrations were never reported")
	}
	if len(rec.natsErrors) != 0 {
		t.Errorf("NATS errors = %v, want none", rec.natsErrors)
	}
}

func TestGracefulStopHandsLeasesOver(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.Lease = time.Hour // only a released lease lets the second broker in
	_, stopFirst := e.startBroker("first")
	g := agentapi.HostGuest{Tenant: tenant, VM: vm, MemoryBytes: 1 << 20}
	src := e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, g)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil, g)
	e.adopt(tenant, vm, "h1")

	resp, err := e.operator().CreateMigration(t.Context(), &broker.CreateMigrationRequest{Tenant: tenant, VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	e.waitMigration(id, func(m *broker.Migration) bool {
		return m.Phase == broker.PhaseTransferring && m.Progress != nil && m.Owner == "first"
	})
	stopFirst() // SIGTERM: the first broker gives its lease up

	second, _ := e.startBroker("second")
	e.waitMigration(id, func(m *broker.Migration) bool { return m.Owner == second.ID() })
	e.waitMigration(id, func(m *broker.Migration) bool { return src.CallCount(agentapi.OpTransfer, id) >= 2 })
	if err := src.Commit(id); err != nil {
		t.Fatal(err)
	}
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
}
