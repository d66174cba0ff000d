package e2e

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// The fleet operations of issue #17 on the real stack: an operator drains, evacuates and
// rebalances hosts through the broker API, the guests move in ordinary migrations, and the
// suite's invariants hold after each.

// fleetScenarios run in an environment of their own (TestE2EFleet). Each starts once the
// hosts of the one before have expired, so that placement sees its own hosts alone.
var fleetScenarios = []scenario{
	{"fleet/rebalance-skewed-fleet", rebalanceSkewed},
	{"fleet/drain-20-guests-onto-three-capacities", drainOntoCapacities},
	{"fleet/drain-with-a-guest-no-host-admits", drainStuckGuest},
	{"fleet/broker-killed-mid-drain", drainBrokerKilled},
	{"fleet/evacuate-below-tcb", evacuateWeakTCB},
	{"fleet/four-drains-share-the-cluster-limits", drainsShareLimits},
}

func TestE2EFleet(t *testing.T) {
	runScenarios(t, fleetScenarios)
}

const (
	// fleetGuestSize is the memory of a fleet scenario's guest, in MiB.
	fleetGuestSize = 4
	// fleetWorkloadRate is the page-write rate of a fleet scenario's guests: low, for twenty
	// guests on two cores.
	fleetWorkloadRate = "200"
	// fleetProbes is how many guests of a fleet scenario the invariants probe with a
	// migration.
	fleetProbes = 2
)

// fleetSpec is spec with small guests and allocMiB of allocatable memory.
func fleetSpec(spec agentSpec, allocMiB int) agentSpec {
	spec.size = fmt.Sprintf("%dMiB", fleetGuestSize)
	spec.allocatable = fmt.Sprintf("%dMiB", allocMiB)
	spec.extra = append(spec.extra, "--workload-rate", fleetWorkloadRate)
	return spec
}

// vms names n guests of the scenario.
func (s *scn) vms(prefix string, n int) []string {
	var out []string
	for i := range n {
		out = append(out, s.vm(fmt.Sprintf("%s%02d", prefix, i)))
	}
	return out
}

// fleetAgents starts the agents of specs and adopts their guests.
func (s *scn) fleetAgents(specs ...agentSpec) []*agent {
	s.t.Helper()
	s.awaitFleetQuiet()
	var out []*agent
	for _, spec := range specs {
		out = append(out, s.agent(spec))
	}
	for _, a := range out {
		for _, vm := range a.spec.guests {
			s.adopt(vm, a)
		}
	}
	return out
}

// awaitFleetQuiet waits until no host of an earlier scenario counts as live any more, so that
// placement chooses among this scenario's hosts only.
func (s *scn) awaitFleetQuiet() {
	s.t.Helper()
	s.awaitQuiet(s.t)
}

// awaitQuiet waits until no host counts as live.
func (e *env) awaitQuiet(t testing.TB) {
	t.Helper()
	poll(t, "the hosts of earlier runs to expire", func() (bool, string) {
		recs, err := e.hostRecords(t.Context())
		if err != nil {
			return false, err.Error()
		}
		for _, r := range recs {
			if time.Since(r.Heartbeat) <= hostTTL+500*time.Millisecond {
				return false, "host " + r.Host + " is still live"
			}
		}
		return true, ""
	})
}

// probeOnly leaves all guests but the first fleetProbes of vms out of the liveness probe.
func (s *scn) probeOnly(vms []string) {
	for i, vm := range vms {
		if i >= fleetProbes {
			s.noProbe[vm] = fmt.Sprintf("fleet: %d guests are probed", fleetProbes)
		}
	}
}

// fleetWatch samples the host records of a set of hosts while a fleet operation runs, and
// remembers every sample in which a host ran more guest memory than it offers.
type fleetWatch struct {
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex
	over    []string
	samples int
}

// watchCapacity samples the host records of hosts every 50 ms until stop is called.
func (s *scn) watchCapacity(hosts []*agent) *fleetWatch {
	w := &fleetWatch{stop: make(chan struct{}), done: make(chan struct{})}
	names := map[string]bool{}
	for _, a := range hosts {
		names[a.host] = true
	}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			recs, err := s.hostRecords(s.t.Context())
			if err == nil {
				w.mu.Lock()
				w.samples++
				for _, r := range recs {
					if names[r.Host] && r.AllocatableBytes > 0 && r.CommittedBytes() > r.AllocatableBytes {
						w.over = append(w.over, fmt.Sprintf("%s ran %d MiB of guests with %d MiB allocatable at %s",
							r.Host, r.CommittedBytes()>>20, r.AllocatableBytes>>20, r.Heartbeat.Format(time.StampMilli)))
					}
				}
				w.mu.Unlock()
			}
			select {
			case <-w.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

// end stops the sampling and returns what went over capacity, and how many samples were taken.
func (w *fleetWatch) end() ([]string, int) {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.over, w.samples
}

// waitOp waits until fleet operation id ends and returns its last view.
func (s *scn) waitOp(id string) *broker.FleetOpView {
	s.t.Helper()
	return s.waitOpFor(id, func(op *broker.FleetOpView) bool { return op.State.Terminal() })
}

// waitOpFor polls fleet operation id until cond holds, and fails after twice waitLimit (an
// operation is many migrations).
func (s *scn) waitOpFor(id string, cond func(*broker.FleetOpView) bool) *broker.FleetOpView {
	s.t.Helper()
	var last *broker.FleetOpView
	err := pollErr(s.t.Context(), 2*waitLimit, func() (bool, string) {
		op, err := s.ops.GetFleetOp(s.t.Context(), id)
		if err != nil {
			return false, err.Error()
		}
		last = op
		if op.State.Terminal() && !cond(op) {
			s.t.Fatalf("fleet operation %s ended %s before the awaited condition: %+v", id, op.State, op.Counts)
		}
		return cond(op), fmt.Sprintf("state %s, %+v", op.State, op.Counts)
	})
	if err != nil {
		s.t.Fatalf("fleet operation %s: %v; last %+v", id, err, last)
	}
	return last
}

// expectItems records, for every guest op moved, its migration's expected end (erased) and
// the guest's new host, so that the invariants check the receipts and where each guest runs.
// It fails unless every guest of op ended as status says, but those listed in except.
func (s *scn) expectItems(op *broker.FleetOpView, byHost map[string]*agent, except map[string]broker.FleetItemStatus) {
	s.t.Helper()
	for _, it := range op.Items {
		want := cmp.Or(except[it.VM], broker.ItemMoved)
		if it.Status != want {
			s.t.Errorf("guest %s of %s: %s (%s), want %s", it.VM, op.ID, it.Status, it.Reason, want)
		}
		if it.Status != broker.ItemMoved {
			continue
		}
		src, dst := byHost[it.From], byHost[it.To]
		if src == nil || dst == nil {
			s.t.Fatalf("guest %s moved from %s to %s: not hosts of the scenario", it.VM, it.From, it.To)
		}
		if it.Outcome != broker.OutcomeErased || it.Migration == "" {
			s.t.Errorf("guest %s moved by %q with outcome %q, want erased", it.VM, it.Migration, it.Outcome)
		}
		s.expect(it.Migration, it.VM, broker.OutcomeErased, src, dst)
	}
}

// byHost maps the agents' host names to them.
func byHost(agents ...*agent) map[string]*agent {
	m := map[string]*agent{}
	for _, a := range agents {
		m[a.host] = a
	}
	return m
}

// hostStates reads the operator's view of every host.
func (s *scn) hostStates() map[string]broker.HostView {
	s.t.Helper()
	resp, err := s.ops.ListHosts(s.t.Context(), &broker.ListHostsRequest{})
	if err != nil {
		s.t.Fatalf("listing hosts as operator: %v", err)
	}
	m := map[string]broker.HostView{}
	for _, h := range resp.Hosts {
		m[h.Host] = h
	}
	return m
}

// awaitHostState waits until the operator's view of host is state: a finished operation
// sets the state of its hosts after it records its own end.
func (s *scn) awaitHostState(host string, state broker.HostState) broker.HostView {
	s.t.Helper()
	var h broker.HostView
	err := pollErr(s.t.Context(), 10*time.Second, func() (bool, string) {
		h = s.hostStates()[host]
		return h.State == state, fmt.Sprintf("host %s is %s (%+v)", host, h.State, h.StateRecord)
	})
	if err != nil {
		s.t.Errorf("want host %s %s: %v", host, state, err)
	}
	return h
}

// concurrency is the most migrations of an operation that were in flight at once: across
// the cluster, out of one host, and into one host; and when each was, for failure messages.
type concurrency struct {
	total, perSource, perDestination int
	timeline                         []string
}

// opConcurrency computes the concurrency of ops' migrations from their records: each was in
// flight from its creation to its end.
func (s *scn) opConcurrency(ops ...*broker.FleetOpView) concurrency {
	s.t.Helper()
	type edge struct {
		at       time.Time
		delta    int
		src, dst string
	}
	var edges []edge
	var c concurrency
	var first time.Time
	for _, op := range ops {
		if first.IsZero() || op.Created.Before(first) {
			first = op.Created
		}
	}
	for _, op := range ops {
		for _, it := range op.Items {
			if it.Migration == "" {
				continue
			}
			m, err := s.migration(s.t.Context(), it.Migration)
			if err != nil {
				s.t.Fatal(err)
			}
			if m.Finished.IsZero() {
				s.t.Fatalf("migration %s of %s has not finished", m.ID, op.ID)
			}
			edges = append(edges, edge{m.Created, 1, m.Source, m.Destination}, edge{m.Finished, -1, m.Source, m.Destination})
			c.timeline = append(c.timeline, fmt.Sprintf("%s %s→%s %v–%v", m.ID, m.Source, m.Destination,
				m.Created.Sub(first).Round(time.Millisecond), m.Finished.Sub(first).Round(time.Millisecond)))
		}
	}
	// An end at the very instant of a start counts first: the start saw it ended.
	slices.SortFunc(edges, func(a, b edge) int { return cmp.Or(a.at.Compare(b.at), cmp.Compare(a.delta, b.delta)) })
	total := 0
	out, in := map[string]int{}, map[string]int{}
	for _, e := range edges {
		total += e.delta
		out[e.src] += e.delta
		in[e.dst] += e.delta
		c.total = max(c.total, total)
		c.perSource = max(c.perSource, out[e.src])
		c.perDestination = max(c.perDestination, in[e.dst])
	}
	return c
}

// checkLimits fails unless the migrations of ops kept within l together.
func (s *scn) checkLimits(l broker.Limits, ops ...*broker.FleetOpView) concurrency {
	s.t.Helper()
	c := s.opConcurrency(ops...)
	if c.total > l.MaxParallel || c.perSource > l.PerSource || c.perDestination > l.PerDestination {
		slices.Sort(c.timeline)
		s.t.Errorf("in flight at once: %d in all, %d out of one host, %d into one host; limits %+v; migrations (created–finished):\n%s",
			c.total, c.perSource, c.perDestination, l, strings.Join(c.timeline, "\n"))
	}
	return c
}

// checkCapacity fails if a host of agents runs more guest memory than it offers, now or in
// one of w's samples.
func (s *scn) checkCapacity(w *fleetWatch, agents []*agent) {
	s.t.Helper()
	over, samples := w.end()
	for _, o := range over {
		s.t.Errorf("over capacity while the operation ran: %s", o)
	}
	if samples < 2 {
		s.t.Errorf("the host records were sampled %d times while the operation ran", samples)
	}
	views := s.hostStates()
	for _, a := range agents {
		h := views[a.host]
		if h.AllocatableBytes > 0 && h.CommittedBytes > h.AllocatableBytes {
			s.t.Errorf("host %s runs %d MiB of guests with %d MiB allocatable", a.host, h.CommittedBytes>>20, h.AllocatableBytes>>20)
		}
	}
}

// drainOntoCapacities drains a host of twenty guests onto three hosts that offer 24, 40 and
// 64 MiB: every guest lands, no host goes over what it offers, the migrations keep within the
// limits, and the drained host ends in maintenance.
func drainOntoCapacities(s *scn) {
	const n = 20
	vms := s.vms("d", n)
	agents := s.fleetAgents(fleetSpec(snp(snpBase, vms...), 96),
		fleetSpec(snp(snpBase), 24), fleetSpec(snp(snpBase), 40), fleetSpec(snp(snpBase), 64))
	src, dsts := agents[0], agents[1:]
	s.probeOnly(vms)
	limits := broker.Limits{MaxParallel: 4, PerSource: 3, PerDestination: 2}
	w := s.watchCapacity(agents)
	start := time.Now()
	resp, err := s.ops.Drain(s.t.Context(), &broker.DrainRequest{Host: src.host, Reason: "e2e: maintenance", Limits: limits})
	if err != nil {
		s.t.Fatalf("draining %s: %v", src.host, err)
	}
	if _, err := s.ops.UncordonHost(s.t.Context(), &broker.UncordonRequest{Host: src.host}); !errors.Is(err, broker.ErrConflict) {
		s.t.Errorf("uncordoning %s while it drains: %v, want a conflict", src.host, err)
	}
	op := s.waitOp(resp.Operation.ID)
	elapsed := time.Since(start)
	s.checkCapacity(w, agents)
	if op.State != broker.FleetDone || op.Counts.Moved != n {
		s.t.Fatalf("drain %s ended %s: %+v", op.ID, op.State, op.Counts)
	}
	s.expectItems(op, byHost(agents...), nil)
	c := s.checkLimits(limits, op)

	s.awaitHostState(src.host, broker.HostMaintenance)
	landed := map[string]int{}
	for _, it := range op.Items {
		landed[it.To]++
	}
	var spread []string
	for _, d := range dsts {
		spread = append(spread, fmt.Sprintf("%d on %s", landed[d.host], d.spec.allocatable))
	}
	s.outcome = fmt.Sprintf("%d of %d moved in %v (%s); at most %d/%d/%d in flight (all/out/in); source in maintenance",
		op.Counts.Moved, n, elapsed.Round(100*time.Millisecond), strings.Join(spread, ", "), c.total, c.perSource, c.perDestination)
}

// drainStuckGuest drains a host one of whose guests has a policy that admits no other host
// (a host label none has), beside a host the operator cordoned: the drain ends done with that
// guest stuck, saying why; it still runs on the source, the others moved, none onto the
// cordoned host, and the source is schedulable again once uncordoned.
func drainStuckGuest(s *scn) {
	vms := s.vms("k", 5)
	stuck := vms[0]
	agents := s.fleetAgents(fleetSpec(snp(snpBase, vms...), 64), fleetSpec(snp(snpBase), 64), fleetSpec(snp(snpBase), 64),
		fleetSpec(snp(snpBase), 64))
	src, cordoned := agents[0], agents[3]
	s.probeOnly(vms)
	if err := s.policy(stuck, secureZone(s.basePolicy)); err != nil {
		s.t.Fatalf("applying the policy of %s: %v", stuck, err)
	}
	if _, err := s.ops.CordonHost(s.t.Context(), &broker.CordonRequest{Host: cordoned.host, Reason: "e2e: cordoned"}); err != nil {
		s.t.Fatalf("cordoning %s: %v", cordoned.host, err)
	}
	resp, err := s.ops.Drain(s.t.Context(), &broker.DrainRequest{Host: src.host, Reason: "e2e: maintenance"})
	if err != nil {
		s.t.Fatalf("draining %s: %v", src.host, err)
	}
	op := s.waitOp(resp.Operation.ID)
	if op.State != broker.FleetDone || op.Counts.Moved != len(vms)-1 || op.Counts.Stuck != 1 {
		s.t.Fatalf("drain %s ended %s: %+v", op.ID, op.State, op.Counts)
	}
	s.expectItems(op, byHost(agents...), map[string]broker.FleetItemStatus{stuck: broker.ItemStuck})
	var reason string
	for _, it := range op.Items {
		if it.VM == stuck {
			reason = it.Reason
		}
	}
	for _, a := range agents[1:] {
		if !strings.Contains(reason, a.host+": ") || !strings.Contains(reason, "label zone") {
			s.t.Errorf("stuck reason %q does not say why %s does not admit the guest (its zone label)", reason, a.host)
		}
	}
	if !strings.Contains(reason, "cordoned by operator: e2e: cordoned") {
		s.t.Errorf("stuck reason %q does not say that %s is cordoned", reason, cordoned.host)
	}
	for _, it := range op.Items {
		if it.To == cordoned.host {
			s.t.Errorf("guest %s moved onto the cordoned host %s", it.VM, it.To)
		}
	}
	// Where it runs: its guest record and the source's host record.
	g, ok, err := getKV[broker.Guest](s.t.Context(), s.js, broker.GuestsBucket, broker.GuestKey(demoTenant, stuck))
	if err != nil || !ok || g.Host != src.host || g.Migration != "" {
		s.t.Errorf("guest record of the stuck guest: %+v, %v; want on %s, no migration", g, err, src.host)
	}
	rec, _, err := getKV[agentapi.HostRecord](s.t.Context(), s.js, broker.HostsBucket, src.host)
	if err != nil || rec == nil || rec.Guest(demoTenant, stuck) == nil || len(rec.Guests) != 1 {
		s.t.Errorf("source host record: %+v, %v; want the stuck guest alone", rec, err)
	}
	s.awaitHostState(src.host, broker.HostCordoned)
	for _, a := range []*agent{src, cordoned} {
		if st, err := s.ops.UncordonHost(s.t.Context(), &broker.UncordonRequest{Host: a.host}); err != nil || st.State != broker.HostSchedulable {
			s.t.Errorf("uncordoning %s: %+v, %v; want schedulable", a.host, st, err)
		}
	}
	s.outcome = fmt.Sprintf("done: %d moved, %s stuck (%s); source cordoned", op.Counts.Moved, stuck, shorten(reason))
}

// drainBrokerKilled kills the broker that drives a drain while guests move; the other broker
// takes the operation over once its lease expires and finishes it, and every guest ends in
// exactly one place.
func drainBrokerKilled(s *scn) {
	vms := s.vms("b", 8)
	agents := s.fleetAgents(fleetSpec(snp(snpBase, vms...), 64), fleetSpec(snp(snpBase), 64), fleetSpec(snp(snpBase), 64))
	src := agents[0]
	s.probeOnly(vms)
	limits := broker.Limits{MaxParallel: 2, PerSource: 2, PerDestination: 1}
	resp, err := s.ops.Drain(s.t.Context(), &broker.DrainRequest{Host: src.host, Reason: "e2e: maintenance", Limits: limits})
	if err != nil {
		s.t.Fatalf("draining %s: %v", src.host, err)
	}
	mid := s.waitOpFor(resp.Operation.ID, func(op *broker.FleetOpView) bool {
		return op.Owner != "" && op.Counts.Moved >= 1 && op.Counts.Migrating >= 1
	})
	s.mu.Lock()
	p := s.brokers[mid.Owner]
	s.mu.Unlock()
	if p == nil {
		s.t.Fatalf("drain owned by %q, not a broker of the suite", mid.Owner)
	}
	p.kill()
	op := s.waitOp(resp.Operation.ID)
	s.restart(p)
	if op.State != broker.FleetDone || op.Counts.Moved != len(vms) {
		s.t.Fatalf("drain %s ended %s after its broker was killed: %+v", op.ID, op.State, op.Counts)
	}
	s.expectItems(op, byHost(agents...), nil)
	s.checkLimits(limits, op)
	// The other broker says it took the operation over.
	var heir *proc
	s.mu.Lock()
	for id, b := range s.brokers {
		if id != mid.Owner {
			heir = b
		}
	}
	s.mu.Unlock()
	if log, err := os.ReadFile(heir.log); err != nil || !strings.Contains(string(log), "Fleet operation taken over") || !strings.Contains(string(log), op.ID) {
		s.t.Errorf("broker %s's log does not say it took %s over (%v):\n%s", heir.name, op.ID, err, heir.tail())
	}
	s.awaitHostState(src.host, broker.HostMaintenance)
	s.outcome = fmt.Sprintf("%s killed at %d moved, %d in flight; the other finished: %d of %d moved, source in maintenance",
		mid.Owner, mid.Counts.Moved, mid.Counts.Migrating, op.Counts.Moved, len(vms))
}

// evacuateWeakTCB evacuates the hosts below snpBase: the dry run lists them and their guests,
// and the evacuation moves every guest onto the hosts at or above it.
func evacuateWeakTCB(s *scn) {
	weak1, weak2 := s.vms("w1-", 3), s.vms("w2-", 3)
	agents := s.fleetAgents(fleetSpec(snp(snpWeak, weak1...), 32), fleetSpec(snp(snpWeak, weak2...), 32),
		fleetSpec(snp(snpBase), 64), fleetSpec(snp(snpHigher), 64))
	s.probeOnly(slices.Concat(weak1[:1], weak2[:1], weak1[1:], weak2[1:]))
	weakHosts := []string{agents[0].host, agents[1].host}
	slices.Sort(weakHosts)
	good := map[string]bool{agents[2].host: true, agents[3].host: true}
	on := map[string]string{}
	for _, vm := range weak1 {
		on[vm] = agents[0].host
	}
	for _, vm := range weak2 {
		on[vm] = agents[1].host
	}

	req := &broker.EvacuateRequest{BelowTCB: snpBase, Reason: "e2e: microcode update"}
	dry := *req
	dry.DryRun = true
	plan, err := s.ops.Evacuate(s.t.Context(), &dry)
	if err != nil {
		s.t.Fatalf("evacuation dry run: %v", err)
	}
	if got := slices.Sorted(slices.Values(plan.Operation.Hosts)); !slices.Equal(got, weakHosts) {
		s.t.Errorf("the dry run evacuates %v, want the weak hosts %v", got, weakHosts)
	}
	listed := map[string]string{}
	for _, it := range plan.Operation.Items {
		listed[it.VM] = it.From
		if !good[it.To] {
			s.t.Errorf("the dry run plans %s onto %s, not a host at or above %s", it.VM, it.To, snpBase)
		}
	}
	if !maps.Equal(listed, on) {
		s.t.Errorf("the dry run lists guests %v, want %v", listed, on)
	}
	if ops, err := s.ops.ListFleetOps(s.t.Context(), &broker.ListFleetOpsRequest{Active: true}); err != nil || len(ops.Operations) != 0 {
		s.t.Errorf("a dry run left active operations: %+v, %v", ops, err)
	}

	resp, err := s.ops.Evacuate(s.t.Context(), req)
	if err != nil {
		s.t.Fatalf("evacuating: %v", err)
	}
	op := s.waitOp(resp.Operation.ID)
	if op.State != broker.FleetDone || op.Counts.Moved != len(on) {
		s.t.Fatalf("evacuation %s ended %s: %+v", op.ID, op.State, op.Counts)
	}
	s.expectItems(op, byHost(agents...), nil)
	for _, it := range op.Items {
		if !good[it.To] {
			s.t.Errorf("%s evacuated onto %s, below %s", it.VM, it.To, snpBase)
		}
	}
	for _, h := range weakHosts {
		if v := s.awaitHostState(h, broker.HostMaintenance); len(v.Guests) != 0 {
			s.t.Errorf("evacuated host %s runs %d guests, want none", h, len(v.Guests))
		}
	}
	s.outcome = fmt.Sprintf("dry run listed %d hosts, %d guests; %d moved onto hosts at or above the TCB", len(plan.Operation.Hosts), len(plan.Operation.Items), op.Counts.Moved)
}

// rebalanceSkewed rebalances a fleet of one host near full and two empty ones: the dry run's
// plan brings every host under the threshold within the move budget, and running it gets
// there.
func rebalanceSkewed(s *scn) {
	const (
		threshold = 0.6
		maxMoves  = 4
		allocMiB  = 32
	)
	vms := s.vms("r", 7) // 28 of 32 MiB
	agents := s.fleetAgents(fleetSpec(snp(snpBase, vms...), allocMiB), fleetSpec(snp(snpBase), allocMiB), fleetSpec(snp(snpBase), allocMiB))
	s.probeOnly(vms)
	ours := byHost(agents...)
	req := &broker.RebalanceRequest{Threshold: threshold, MaxMoves: maxMoves}
	dry := *req
	dry.DryRun = true
	plan, err := s.ops.Rebalance(s.t.Context(), &dry)
	if err != nil {
		s.t.Fatalf("rebalance dry run: %v", err)
	}
	if n := len(plan.Operation.Items); n == 0 || n > maxMoves {
		s.t.Fatalf("the plan has %d moves, want 1 to %d", n, maxMoves)
	}
	for _, h := range plan.Plan.Hosts {
		if ours[h.Host] == nil {
			continue
		}
		if float64(h.CommittedAfter) > threshold*float64(h.AllocatableBytes) {
			s.t.Errorf("the plan leaves %s at %d of %d MiB, over %.0f%%", h.Host, h.CommittedAfter>>20, h.AllocatableBytes>>20, threshold*100)
		}
	}
	resp, err := s.ops.Rebalance(s.t.Context(), req)
	if err != nil {
		s.t.Fatalf("rebalancing: %v", err)
	}
	if resp.Operation.State == "" {
		s.t.Fatalf("the rebalance started nothing: %+v", resp.Plan)
	}
	op := s.waitOp(resp.Operation.ID)
	if op.State != broker.FleetDone || op.Counts.Moved != len(plan.Operation.Items) {
		s.t.Fatalf("rebalance %s ended %s: %+v (planned %d moves)", op.ID, op.State, op.Counts, len(plan.Operation.Items))
	}
	s.expectItems(op, ours, nil)
	var loads []string
	err = pollErr(s.t.Context(), waitLimit, func() (bool, string) {
		views := s.hostStates()
		loads = loads[:0]
		for _, a := range agents {
			h := views[a.host]
			loads = append(loads, fmt.Sprintf("%d/%d MiB", h.CommittedBytes>>20, h.AllocatableBytes>>20))
			if float64(h.CommittedBytes) > threshold*float64(h.AllocatableBytes) {
				return false, fmt.Sprintf("%s at %d of %d MiB", a.host, h.CommittedBytes>>20, h.AllocatableBytes>>20)
			}
		}
		return true, ""
	})
	if err != nil {
		s.t.Errorf("after the rebalance: %v", err)
	}
	s.outcome = fmt.Sprintf("planned and made %d moves (budget %d): hosts at %s, all under %.0f%%", op.Counts.Moved, maxMoves, strings.Join(loads, ", "), threshold*100)
}

// benchRuns numbers BenchmarkDrain's iterations across runs, for unique guest names.
var benchRuns atomic.Int64

// BenchmarkDrain weighs a drain against the guests moved by hand, in one run on one stack:
//   - one-by-one: k guests migrated one after the other, each waited for until its source
//     erased it (lethectl migrate --wait), the broker choosing the destination;
//   - drain: a host of k guests drained with the broker's default limits.
//
// Both move k guests of 4 MiB from one host onto three, and report guests moved per minute.
func BenchmarkDrain(b *testing.B) {
	const k = 10
	e := newEnv(b)
	for _, mode := range []string{"one-by-one", "drain"} {
		b.Run(mode, func(b *testing.B) {
			var elapsed time.Duration
			for range b.N {
				b.StopTimer()
				var vms []string
				run := benchRuns.Add(1) // -count runs the benchmark again on the same stack
				for g := range k {
					vms = append(vms, fmt.Sprintf("bench-%s-%d-%02d", mode, run, g))
				}
				e.awaitQuiet(b)
				src := e.startAgent(b, fleetSpec(snp(snpBase, vms...), 64))
				for range 3 {
					e.startAgent(b, fleetSpec(snp(snpBase), 64))
				}
				for _, vm := range vms {
					if _, err := e.demo.AdoptGuest(b.Context(), &broker.AdoptGuestRequest{VM: vm, Host: src.host}); err != nil {
						b.Fatalf("adopting %s: %v", vm, err)
					}
				}
				b.StartTimer()
				start := time.Now()
				switch mode {
				case "one-by-one":
					for _, vm := range vms {
						resp, err := e.demo.CreateMigration(b.Context(), &broker.CreateMigrationRequest{VM: vm})
						if err != nil {
							b.Fatalf("migrating %s: %v", vm, err)
						}
						m := e.watchMigration(b, resp.Migration.ID, func(m *broker.Migration) bool { return m.Phase.Terminal() })
						if m.Outcome != broker.OutcomeErased {
							b.Fatalf("migration %s of %s ended %s: %s", m.ID, vm, m.Outcome, m.AbortReason)
						}
					}
				case "drain":
					resp, err := e.ops.Drain(b.Context(), &broker.DrainRequest{Host: src.host, Reason: "benchmark"})
					if err != nil {
						b.Fatalf("draining %s: %v", src.host, err)
					}
					var op *broker.FleetOpView
					poll(b, "the drain", func() (bool, string) {
						op, err = e.ops.GetFleetOp(b.Context(), resp.Operation.ID)
						if err != nil {
							return false, err.Error()
						}
						return op.State.Terminal(), fmt.Sprintf("%s %+v", op.State, op.Counts)
					})
					if op.State != broker.FleetDone || op.Counts.Moved != k {
						b.Fatalf("drain %s ended %s: %+v", op.ID, op.State, op.Counts)
					}
				}
				elapsed += time.Since(start)
			}
			b.ReportMetric(float64(k*b.N)/elapsed.Minutes(), "guests/min")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// drainsShareLimits drains four hosts at once, each operation with the same limits: the
// limits count every migration in flight across the cluster, not only an operation's own, so
// the four together keep within them, whichever broker drives each.
func drainsShareLimits(s *scn) {
	var specs []agentSpec
	var all []string
	for h := range 4 {
		vms := s.vms(fmt.Sprintf("l%d-", h), 2)
		all = append(all, vms...)
		specs = append(specs, fleetSpec(snp(snpBase, vms...), 64))
	}
	specs = append(specs, fleetSpec(snp(snpBase), 64), fleetSpec(snp(snpBase), 64))
	agents := s.fleetAgents(specs...)
	s.probeOnly(all)
	limits := broker.Limits{MaxParallel: 2, PerSource: 1, PerDestination: 1}
	var ids []string
	for _, src := range agents[:4] {
		resp, err := s.ops.Drain(s.t.Context(), &broker.DrainRequest{Host: src.host, Reason: "e2e: maintenance", Limits: limits})
		if err != nil {
			s.t.Fatalf("draining %s: %v", src.host, err)
		}
		ids = append(ids, resp.Operation.ID)
	}
	// Which broker drives each operation: the request went to either.
	drivers := map[string]int{}
	for _, id := range ids {
		op := s.waitOpFor(id, func(op *broker.FleetOpView) bool { return op.Owner != "" || op.State.Terminal() })
		drivers[cmp.Or(op.Owner, "?")]++
	}
	var ops []*broker.FleetOpView
	for _, id := range ids {
		op := s.waitOp(id)
		if op.State != broker.FleetDone || op.Counts.Moved != 2 {
			s.t.Fatalf("drain %s ended %s: %+v", op.ID, op.State, op.Counts)
		}
		s.expectItems(op, byHost(agents...), nil)
		ops = append(ops, op)
	}
	c := s.checkLimits(limits, ops...)
	s.t.Logf("drivers of the four drains: %v", drivers)
	s.outcome = fmt.Sprintf("8 of 8 moved; at most %d/%d/%d in flight (all/out/in), limits %d/%d/%d; drivers %v",
		c.total, c.perSource, c.perDestination, limits.MaxParallel, limits.PerSource, limits.PerDestination, drivers)
}
