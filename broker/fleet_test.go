package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// putHost rewrites host's record as its agent's heartbeat would.
func (e *env) putHost(rec agentapi.HostRecord) {
	e.t.Helper()
	rec.Heartbeat = e.clock.Now()
	if err := agentapi.PutHost(context.Background(), e.connect(natsauth.RoleAgent, rec.Host), &rec); err != nil {
		e.t.Fatal(err)
	}
}

func snpTCB(ucode uint8) *attest.HostTCB {
	return &attest.HostTCB{SNP: &attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: ucode}}
}

func TestCordonKeepsNewGuestsOff(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.addAgent("h3", attest.PlatformEmulatedSEVSNP, "eu", nil)
	ctx := t.Context()
	op := e.operator()

	if _, err := e.tenant(tenant).CordonHost(ctx, &broker.CordonRequest{Host: "h2"}); !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("a tenant cordoning a host: %v, want no answer (the operation is not served to tenants)", err)
	}
	st, err := op.CordonHost(ctx, &broker.CordonRequest{Host: "h2", Reason: "firmware update"})
	if err != nil {
		t.Fatal(err)
	}
	if st.State != broker.HostCordoned || st.By != "operator" || st.Reason != "firmware update" {
		t.Errorf("cordon: %+v", st)
	}
	dry, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dry.DryRun.Order, []string{"h3"}) {
		t.Errorf("dry run order %v, want [h3]", dry.DryRun.Order)
	}
	for _, v := range dry.DryRun.Hosts {
		if v.Host == "h2" && (v.Pass || strings.Join(v.Reasons, ";") != "cordoned: takes no new guests") {
			t.Errorf("h2's verdict for the tenant %+v, want cordoned without the operator's reason", v)
		}
	}
	odry, err := op.CreateMigration(ctx, &broker.CreateMigrationRequest{Tenant: tenant, VM: vm, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range odry.DryRun.Hosts {
		if v.Host == "h2" && (v.Pass || !strings.Contains(strings.Join(v.Reasons, ";"), "cordoned by operator: firmware update")) {
			t.Errorf("h2's verdict for the operator %+v, want cordoned with the reason", v)
		}
	}
	if _, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"}); !errors.Is(err, broker.ErrFailedPrecondition) || !strings.Contains(err.Error(), "cordoned") {
		t.Errorf("a migration to the cordoned host: %v, want refused as cordoned", err)
	}
	hosts, err := op.ListHosts(ctx, &broker.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts.Hosts {
		want := broker.HostSchedulable
		if h.Host == "h2" {
			want = broker.HostCordoned
		}
		if h.State != want {
			t.Errorf("host %s listed %s, want %s", h.Host, h.State, want)
		}
	}
	if _, err := op.UncordonHost(ctx, &broker.UncordonRequest{Host: "h2"}); err != nil {
		t.Fatal(err)
	}
	dry, err = e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(dry.DryRun.Order, "h2") {
		t.Errorf("after uncordon, order %v lacks h2", dry.DryRun.Order)
	}
}

func TestPlacementRanksByTCBThenMemoryAndFits(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.startBroker("b1")
	g := agentapi.HostGuest{Tenant: tenant, VM: vm, MemoryBytes: 512 << 20}
	other := func(n int, mib uint64) agentapi.HostGuest {
		return agentapi.HostGuest{Tenant: "other", VM: fmt.Sprintf("g%d", n), MemoryBytes: mib << 20}
	}
	for _, h := range []agentapi.HostRecord{
		{Host: "src", TCB: snpTCB(115), AllocatableBytes: 4 << 30, Guests: []agentapi.HostGuest{g}},
		// Below the source's TCB: last, however empty.
		{Host: "old", TCB: snpTCB(100), AllocatableBytes: 8 << 30},
		// At least the source's, half full.
		{Host: "busy", TCB: snpTCB(115), AllocatableBytes: 4 << 30, Guests: []agentapi.HostGuest{other(1, 2048)}},
		// At least the source's, a quarter full: first.
		{Host: "calm", TCB: snpTCB(120), AllocatableBytes: 4 << 30, Guests: []agentapi.HostGuest{other(2, 1024)}},
		// TCB unknown: after those known to suffice.
		{Host: "unknown", AllocatableBytes: 4 << 30},
		// No room for 512 MiB.
		{Host: "full", TCB: snpTCB(120), AllocatableBytes: 1 << 30, Guests: []agentapi.HostGuest{other(3, 768)}},
	} {
		h.Platform, h.Region, h.DataAddr = attest.PlatformEmulatedSEVSNP, "eu", h.Host+":1"
		e.addAgent(h.Host, attest.PlatformEmulatedSEVSNP, "eu", nil)
		e.putHost(h)
	}
	e.adopt(tenant, vm, "src")
	dry, err := e.operator().CreateMigration(t.Context(), &broker.CreateMigrationRequest{Tenant: tenant, VM: vm, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"calm", "busy", "unknown", "old"}; !slices.Equal(dry.DryRun.Order, want) {
		t.Errorf("order %v, want %v", dry.DryRun.Order, want)
	}
	for _, v := range dry.DryRun.Hosts {
		if v.Host == "full" && (v.Pass || !strings.Contains(strings.Join(v.Reasons, ";"), "no room: 256 MiB free")) {
			t.Errorf("full's verdict %+v, want no room", v)
		}
	}
	tdry, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range tdry.DryRun.Hosts {
		if v.Host == "full" && strings.Join(v.Reasons, ";") != "no room for the guest's 512 MiB" {
			t.Errorf("full's verdict for the tenant %+v, want no room without other tenants' figures", v)
		}
	}
	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Migration.Destination != "calm" {
		t.Errorf("placed on %s, want calm", resp.Migration.Destination)
	}
}

// TestDrainKeepsLimitsAndSurvivesItsBroker drains a host of six guests onto two hosts with at
// most one migration into each host and two in all, stopping the broker that drives it
// half-way: a second broker finishes it, and every guest moves once.
func TestDrainKeepsLimitsAndSurvivesItsBroker(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	_, stop1 := e.startBroker("b1")
	const n = 6
	var guests []agentapi.HostGuest
	for i := range n {
		guests = append(guests, agentapi.HostGuest{Tenant: tenant, VM: fmt.Sprintf("vm%d", i), MemoryBytes: 1 << 20})
	}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	e.addAgent("h3", attest.PlatformEmulatedSEVSNP, "eu", nil)
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
	}
	ctx := t.Context()
	op := e.operator()
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h1", Reason: "kernel update", Limits: broker.Limits{MaxParallel: 2, PerDestination: 1, PerSource: 5}})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Operation.ID
	if resp.Operation.Counts.Total != n {
		t.Fatalf("drain of %d guests, want %d", resp.Operation.Counts.Total, n)
	}
	// The limits hold for the migrations as recorded, in the order of the bucket's stream:
	// the broker starts one only after it read the end of another.
	peak := watchInFlight(t, e)
	committed := map[string]bool{}
	stopped := false
	last := e.waitFleetOp(id, func(v *broker.FleetOpView) bool {
		for _, it := range v.Items {
			if it.Status == broker.ItemMigrating && !committed[it.Migration] && e.agents["h1"].Commit(it.Migration) == nil {
				committed[it.Migration] = true
			}
		}
		if !stopped && v.Counts.Moved >= 2 {
			stop1()
			stopped = true
			e.startBroker("b2")
		}
		return v.State.Terminal()
	})
	if last.State != broker.FleetDone || last.Counts.Moved != n {
		t.Fatalf("drain ended %+v, want done with %d moved", last, n)
	}
	if !stopped {
		t.Error("the first broker was never stopped mid-drain")
	}
	all, into := peak()
	if all > 2 {
		t.Errorf("%d migrations in flight at once, limit 2", all)
	}
	for h, k := range into {
		if k > 1 {
			t.Errorf("%d migrations into %s at once, limit 1", k, h)
		}
	}
	if all < 2 {
		t.Errorf("at most %d migration in flight: the drain never used its parallelism", all)
	}
	for _, it := range last.Items {
		if it.Outcome != broker.OutcomeErased || it.Migration == "" {
			t.Errorf("%s: %s %s, want erased with its migration", it.VM, it.Status, it.Outcome)
		}
	}
	hosts, err := op.ListHosts(ctx, &broker.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts.Hosts {
		if h.Host == "h1" && (h.State != broker.HostMaintenance || h.StateRecord == nil || !strings.Contains(h.StateRecord.Reason, id)) {
			t.Errorf("h1 after the drain: %s %+v, want maintenance naming %s", h.State, h.StateRecord, id)
		}
	}
	if _, err := op.UncordonHost(ctx, &broker.UncordonRequest{Host: "h1"}); err != nil {
		t.Errorf("uncordon after the drain: %v", err)
	}
}

// TestDrainReportsAGuestNoHostAdmits: a guest whose only other host is cordoned is stuck,
// with the reason, and stays; the drain still ends.
func TestDrainReportsAGuestNoHostAdmits(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true
	ctx := t.Context()
	op := e.operator()
	if _, err := op.CordonHost(ctx, &broker.CordonRequest{Host: "h2", Reason: "full"}); err != nil {
		t.Fatal(err)
	}
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	v := e.waitFleetOp(resp.Operation.ID, opEnded)
	if v.State != broker.FleetDone || v.Counts.Stuck != 1 || !strings.Contains(v.Items[0].Reason, "h2: cordoned by operator: full") {
		t.Fatalf("drain ended %s with %+v, items %+v; want done, the guest stuck with h2's reason", v.State, v.Counts, v.Items)
	}
	hosts, err := op.ListHosts(ctx, &broker.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts.Hosts {
		if h.Host == "h1" && h.State != broker.HostCordoned {
			t.Errorf("h1 after a drain that left a guest: %s, want cordoned", h.State)
		}
	}
}

// watchInFlight follows the migrations bucket in stream order and returns a function that
// reports the most migrations that were unfinished at once, in all and into each host.
func watchInFlight(t *testing.T, e *env) func() (int, map[string]int) {
	t.Helper()
	w, err := e.kv(broker.MigrationsBucket).WatchAll(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Stop() })
	var mu sync.Mutex
	active := map[string]string{} // id → destination
	peakAll, peakInto := 0, map[string]int{}
	go func() {
		for u := range w.Updates() {
			if u == nil || u.Operation() != jetstream.KeyValuePut {
				continue
			}
			var m broker.Migration
			if json.Unmarshal(u.Value(), &m) != nil {
				continue
			}
			mu.Lock()
			if m.Phase.Terminal() {
				delete(active, m.ID)
			} else {
				active[m.ID] = m.Destination
			}
			peakAll = max(peakAll, len(active))
			into := map[string]int{}
			for _, d := range active {
				into[d]++
				peakInto[d] = max(peakInto[d], into[d])
				if into[d] > 1 {
					t.Logf("over the limit into %s: %v after %s entered %s", d, active, m.ID, m.Phase)
				}
			}
			mu.Unlock()
		}
	}()
	return func() (int, map[string]int) {
		mu.Lock()
		defer mu.Unlock()
		return peakAll, maps.Clone(peakInto)
	}
}

// TestDrainDryRunPlansAndChangesNothing: the plan names each guest's destination and each
// host's memory before and after, and the host stays schedulable.
func TestDrainDryRunPlansAndChangesNothing(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	ctx := t.Context()
	op := e.operator()
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h1", DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Operation.State != "" || len(resp.Operation.Items) != 1 || resp.Operation.Items[0].To != "h2" {
		t.Fatalf("dry run: %+v, want one guest planned to h2 and no state", resp.Operation)
	}
	got := map[string][2]uint64{}
	for _, h := range resp.Plan.Hosts {
		got[h.Host] = [2]uint64{h.CommittedBefore, h.CommittedAfter}
	}
	if want := (map[string][2]uint64{"h1": {guestMiB << 20, 0}, "h2": {guestMiB << 20, 2 * guestMiB << 20}}); !maps.Equal(got, want) {
		t.Errorf("committed before/after %v, want %v", got, want)
	}
	ops, err := op.ListFleetOps(ctx, &broker.ListFleetOpsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	hosts, err := op.ListHosts(ctx, &broker.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ops.Operations) != 0 || hosts.Hosts[0].State != broker.HostSchedulable {
		t.Errorf("after a dry run: %d operations recorded, h1 %s", len(ops.Operations), hosts.Hosts[0].State)
	}
}
