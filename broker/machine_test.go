package broker_test

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/agentapi/agentapitest"
)

// phaseEvents collects the phase events of all migrations, in order; the function it returns
// waits (up to 10 s) until migration id has n phase events and returns them.
func phaseEvents(t *testing.T, e *env) func(id string, n int) []broker.Phase {
	t.Helper()
	var mu sync.Mutex
	got := map[string][]broker.Phase{}
	changed := make(chan struct{}, 1)
	nc := e.srv.Connect(t)
	_, err := nc.Subscribe(broker.EventsSubjectPrefix+".>", func(m *nats.Msg) {
		var ev broker.Event
		if json.Unmarshal(m.Data, &ev) != nil || ev.Kind != broker.EventPhase {
			return
		}
		mu.Lock()
		got[ev.MigrationID] = append(got[ev.MigrationID], ev.Phase)
		mu.Unlock()
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return func(id string, n int) []broker.Phase {
		timeout := time.After(10 * time.Second)
		for {
			mu.Lock()
			p := append([]broker.Phase(nil), got[id]...)
			mu.Unlock()
			if len(p) >= n {
				return p
			}
			select {
			case <-changed:
			case <-timeout:
				return p
			}
		}
	}
}

func TestHappyPath(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true
	events := phaseEvents(t, e)
	ctx := t.Context()

	resp, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	// The event stream saw every phase, in order (the Erased event follows the record).
	want := []broker.Phase{broker.PhaseRequested, broker.PhaseAttesting, broker.PhaseKeysReleased,
		broker.PhaseTransferring, broker.PhaseCuttingOver, broker.PhaseCommitted, broker.PhaseErased}
	got := events(id, len(want))
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("phases (-want +got):\n%s", diff)
	}

	guests, err := e.tenant(tenant).ListGuests(ctx, &broker.ListGuestsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(guests.Guests) != 1 {
		t.Fatalf("guests = %+v", guests.Guests)
	}
	g := guests.Guests[0]
	if diff := cmp.Diff([]any{"h2", uint64(2), ""}, []any{g.Host, g.Epoch, g.Migration}); diff != "" {
		t.Errorf("guest host, epoch, migration (-want +got):\n%s", diff)
	}
	r, err := e.tenant(tenant).GetReceipt(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if r.Outcome != broker.OutcomeErased || len(r.Envelope) == 0 {
		t.Errorf("receipt = %+v", r)
	}
	checkReceiptLog(t, r, tlog.KindCommit)
	d := e.kb.Destroys()
	if len(d) != 1 || d[0].Ending != kbwire.Commit || d[0].Erasure == nil || d[0].Erasure.Evidence == nil {
		t.Errorf("destroys = %+v, want one commit with erasure evidence", d)
	}
	if _, erased, _, _ := e.agents["h1"].State(id); !erased {
		t.Error("source not erased")
	}
	got2, err := e.tenant(tenant).GetMigration(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if got2.SourceKeys != nil || got2.DestinationKeys != nil || got2.NextWrappedMDK != "" {
		t.Error("API returned sealed keys or wrapped key")
	}
	if got2.SourceEvidence == "" || got2.DestinationEvidence == "" || got2.ErasureEvidence == "" {
		t.Errorf("evidence digests missing: %+v", got2)
	}
}

// TestErasureRefused: when the keybroker refuses the source's erasure evidence (the tenant's
// policy does not accept it), the broker still commits, asking for a receipt that says the
// erasure is unverified, so that the source's keys are destroyed all the same.
// checkReceiptLog checks that a stored receipt kept the keybroker's log proof as it was sent:
// it still proves that the migration's ending, of kind want, is in the log and names this
// receipt.
func checkReceiptLog(t *testing.T, r *broker.Receipt, want tlog.Kind) {
	t.Helper()
	if len(r.Log) == 0 {
		t.Fatal("the stored receipt has no log proof")
	}
	var inc tlog.Inclusion
	if err := json.Unmarshal(r.Log, &inc); err != nil {
		t.Fatalf("decoding the log proof: %v", err)
	}
	v, err := tlog.LogVerifier(brokertest.LogOrigin, brokertest.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	cp, err := tlog.Open(inc.Checkpoint, v, nil, 0)
	if err != nil {
		t.Fatalf("opening the proof's checkpoint: %v", err)
	}
	env, err := receipt.Parse(r.Envelope)
	if err != nil {
		t.Fatal(err)
	}
	entry, err := tlog.VerifyReceipt(cp, &inc, r.MigrationID, env.Payload)
	if err != nil {
		t.Fatalf("the stored log proof does not prove the receipt: %v", err)
	}
	if entry.Kind != want {
		t.Errorf("the logged ending is a %s, want %s", entry.Kind, want)
	}
}

func TestErasureRefused(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true
	e.kb.RefuseErasure = "erasure.maxDelay: 10m0s after the commit, allowed 1m0s"
	ctx := t.Context()
	resp, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased || m.Outcome != broker.OutcomeCommittedUnverifiedErasure {
		t.Fatalf("phase %s, outcome %q, want Erased with %s", m.Phase, m.Outcome, broker.OutcomeCommittedUnverifiedErasure)
	}
	if !slices.ContainsFunc(m.Notes, func(n string) bool { return strings.Contains(n, "maxDelay") }) {
		t.Errorf("notes %q do not say why the erasure is unverified", m.Notes)
	}
	d := e.kb.Destroys()
	if len(d) < 2 || d[0].UnverifiedErasure || !d[len(d)-1].UnverifiedErasure || d[len(d)-1].Erasure == nil {
		t.Errorf("destroys = %+v, want a commit with evidence, then one with evidence and unverifiedErasure", d)
	}
	r, err := e.tenant(tenant).GetReceipt(ctx, id)
	if err != nil || r.Outcome != broker.OutcomeCommittedUnverifiedErasure {
		t.Errorf("receipt %+v, %v; want outcome %s", r, err, broker.OutcomeCommittedUnverifiedErasure)
	}
}

func TestBrokerKilledMidMigration(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.Lease = 30 * time.Second
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
		return m.Phase == broker.PhaseTransferring && m.Progress != nil
	})
	stopFirst() // the first broker dies holding the lease

	second, _ := e.startBroker("second")
	e.clock.Advance(31 * time.Second) // the first broker's lease expires
	e.waitMigration(id, func(m *broker.Migration) bool { return m.Owner == second.ID() })
	// The second broker re-attached to the running transfer.
	e.waitMigration(id, func(m *broker.Migration) bool { return src.CallCount(agentapi.OpTransfer, id) >= 2 })
	if err := src.Commit(id); err != nil {
		t.Fatal(err)
	}
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
}

func TestAgentLostMidTransfer(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	e.waitMigration(id, func(m *broker.Migration) bool { return m.Phase == broker.PhaseTransferring && m.Progress != nil })
	if err := e.agents["h1"].Report(id, agentapi.Progress{Phase: agentapi.TransferPrecopy, Round: 1, Bytes: 4096}); err != nil {
		t.Fatal(err)
	}
	// The destination's host record disappears, as when its heartbeat stops past the TTL.
	if err := e.kv(broker.HostsBucket).Delete(t.Context(), "h2"); err != nil {
		t.Fatal(err)
	}
	m := e.waitMigration(id, inPhase(broker.PhaseAborted, broker.PhaseErased))
	if m.Phase != broker.PhaseAborted || !strings.Contains(m.AbortReason, "agent lost") {
		t.Fatalf("phase %s reason %q, want Aborted for agent lost", m.Phase, m.AbortReason)
	}
	if _, _, aborted, resumed := e.agents["h1"].State(id); !aborted || !resumed {
		t.Errorf("source aborted=%v resumed=%v, want both", aborted, resumed)
	}
	if keys, _, aborted, _ := e.agents["h2"].State(id); !aborted || keys {
		t.Errorf("destination aborted=%v keys=%v, want aborted without keys", aborted, keys)
	}
	d := e.kb.Destroys()
	if len(d) != 1 || d[0].Ending != kbwire.Abort || d[0].MigrationID != id {
		t.Errorf("destroys = %+v, want one abort of %s", d, id)
	}
	g, err := e.tenant(tenant).ListGuests(t.Context(), &broker.ListGuestsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]any{"h1", uint64(1), ""}, []any{g.Guests[0].Host, g.Guests[0].Epoch, g.Guests[0].Migration}); diff != "" {
		t.Errorf("guest stays at the source (-want +got):\n%s", diff)
	}
	r, err := e.tenant(tenant).GetReceipt(t.Context(), id)
	if err != nil || r.Outcome != broker.OutcomeAborted {
		t.Errorf("receipt %+v, %v; want aborted", r, err)
	}
}

func TestConcurrentRequestsOneProceeds(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	ids := make([]string, n)
	for i := range n {
		wg.Go(func() {
			resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
			errs[i] = err
			if err == nil {
				ids[i] = resp.Migration.ID
			}
		})
	}
	wg.Wait()
	ok, conflicts := 0, 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
			e.waitMigration(ids[i], inPhase(broker.PhaseTransferring))
		case errors.Is(err, broker.ErrConflict):
			conflicts++
		default:
			t.Errorf("request %d: %v", i, err)
		}
	}
	if ok != 1 || conflicts != n-1 {
		t.Errorf("%d proceeded, %d conflicts; want 1 and %d", ok, conflicts, n-1)
	}
}

func TestTimeouts(t *testing.T) {
	tests := map[string]struct {
		advance time.Duration
		report  bool
		want    string
	}{
		"no progress":        {advance: 151 * time.Second, want: "no progress"},
		"progress continues": {advance: 100 * time.Second, report: true, want: "not complete"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, natstest.Options{})
			e.cfg.Timeouts = broker.Timeouts{Progress: 150 * time.Second, PerGiB: 150 * time.Second}
			e.standard()
			resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
			if err != nil {
				t.Fatal(err)
			}
			id := resp.Migration.ID
			e.waitMigration(id, func(m *broker.Migration) bool { return m.Phase == broker.PhaseTransferring && m.Progress != nil })
			if tc.report {
				// Progress keeps coming, but the whole transfer exceeds max(150 s, 150 s/GiB × 1 MiB).
				for i := range 2 {
					e.clock.Advance(tc.advance)
					if err := e.agents["h1"].Report(id, agentapi.Progress{Phase: agentapi.TransferPrecopy, Round: i + 1}); err != nil {
						t.Fatal(err)
					}
					e.waitMigration(id, func(m *broker.Migration) bool { return m.Progress.Round == i+1 || m.Phase != broker.PhaseTransferring })
				}
			} else {
				e.clock.Advance(tc.advance)
			}
			m := e.waitMigration(id, inPhase(broker.PhaseAborted, broker.PhaseErased))
			if m.Phase != broker.PhaseAborted || !strings.Contains(m.AbortReason, tc.want) {
				t.Fatalf("phase %s reason %q, want Aborted for %q", m.Phase, m.AbortReason, tc.want)
			}
			if _, _, _, resumed := e.agents["h1"].State(id); !resumed {
				t.Error("guest not resumed at the source")
			}
		})
	}
}

func TestAbortRequestedAndDenied(t *testing.T) {
	t.Run("denied", func(t *testing.T) {
		e := newEnv(t, natstest.Options{})
		e.standard()
		e.kb.Deny = "destination snp.tcb.microcode 0x12 < source 0x14"
		resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm})
		if err != nil {
			t.Fatal(err)
		}
		m := e.waitMigration(resp.Migration.ID, inPhase(broker.PhaseAborted))
		if !strings.Contains(m.AbortReason, "microcode") {
			t.Errorf("reason %q does not carry the denial", m.AbortReason)
		}
	})
	t.Run("requested", func(t *testing.T) {
		e := newEnv(t, natstest.Options{})
		e.standard()
		resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm})
		if err != nil {
			t.Fatal(err)
		}
		id := resp.Migration.ID
		e.waitMigration(id, inPhase(broker.PhaseTransferring))
		if _, err := e.tenant("other").AbortMigration(t.Context(), &broker.AbortMigrationRequest{ID: id}); !errors.Is(err, broker.ErrNotFound) {
			t.Errorf("another tenant's abort: %v, want ErrNotFound", err)
		}
		if _, err := e.tenant(tenant).AbortMigration(t.Context(), &broker.AbortMigrationRequest{ID: id, Reason: "changed my mind"}); err != nil {
			t.Fatal(err)
		}
		m := e.waitMigration(id, inPhase(broker.PhaseAborted))
		if m.AbortReason != "requested by tenant:acme: changed my mind" {
			t.Errorf("reason %q", m.AbortReason)
		}
		r, err := e.tenant(tenant).GetReceipt(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		checkReceiptLog(t, r, tlog.KindAbort)
		// A new migration of the guest may start once the first is aborted.
		if _, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm}); err != nil {
			t.Errorf("new migration after abort: %v", err)
		}
	})
}

func TestTenantIsolation(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true
	ctx := t.Context()
	resp, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	e.waitMigration(id, inPhase(broker.PhaseErased))
	other := e.tenant("globex")
	if _, err := other.GetMigration(ctx, id); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("get: %v, want ErrNotFound", err)
	}
	if _, err := other.GetReceipt(ctx, id); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("receipt: %v, want ErrNotFound", err)
	}
	list, err := other.ListMigrations(ctx, &broker.ListMigrationsRequest{})
	if err != nil || len(list.Migrations) != 0 {
		t.Errorf("list: %d migrations, %v; want none", len(list.Migrations), err)
	}
	if _, err := other.CreateMigration(ctx, &broker.CreateMigrationRequest{Tenant: tenant, VM: vm}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("create for another tenant: %v, want ErrNotFound", err)
	}
	hosts, err := other.ListHosts(ctx, &broker.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts.Hosts {
		if len(h.Guests) != 0 {
			t.Errorf("host %s shows another tenant's guests: %+v", h.Host, h.Guests)
		}
	}
	ops, err := e.operator().ListMigrations(ctx, &broker.ListMigrationsRequest{})
	if err != nil || len(ops.Migrations) != 1 {
		t.Errorf("operator list: %v, %v", ops, err)
	}
}

func TestDryRun(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.ReadPolicy = func([]byte) (*broker.Prefilter, error) {
		return &broker.Prefilter{
			Platforms: []attest.Platform{attest.PlatformEmulatedSEVSNP},
			Labels:    map[string]string{"zone": "a"},
			Regions:   []string{"eu"},
		}, nil
	}
	e.startBroker("b1")
	g := agentapi.HostGuest{Tenant: tenant, VM: vm, MemoryBytes: 1 << 20}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", map[string]string{"zone": "a"}, g)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", map[string]string{"zone": "a"})
	e.addAgent("h3", attest.PlatformEmulatedSEVSNP, "us", map[string]string{"zone": "b"})
	e.addAgent("h4", attest.PlatformEmulatedTDX, "eu", map[string]string{"zone": "a"})
	e.adopt(tenant, vm, "h1")

	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	want := &broker.DryRun{
		Tenant: tenant, VM: vm, Source: "h1", Platform: attest.PlatformEmulatedSEVSNP, PolicyKey: tenant,
		Notes: []string{broker.UncheckedNote},
		Order: []string{"h2"},
		Hosts: []broker.HostVerdict{
			{Host: "h1", Reasons: []string{"is the guest's current host"}},
			{Host: "h2", Pass: true},
			{Host: "h3", Reasons: []string{`label zone="b", policy requires "a"`, `region "us" not allowed by policy (allowed: eu)`}},
			{Host: "h4", Reasons: []string{
				"platform emulated-tdx not allowed by policy (allowed: emulated-sev-snp)",
			}},
		},
	}
	if diff := cmp.Diff(want, resp.DryRun); diff != "" {
		t.Errorf("dry run (-want +got):\n%s", diff)
	}
	if resp.Migration != nil {
		t.Error("dry run created a migration")
	}
	if _, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h3"}); !errors.Is(err, broker.ErrFailedPrecondition) {
		t.Errorf("migrating to a host that fails the pre-filter: %v, want ErrFailedPrecondition", err)
	}
	chosen, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm})
	if err != nil {
		t.Fatal(err)
	}
	if chosen.Migration.Destination != "h2" {
		t.Errorf("chosen destination %s, want h2", chosen.Migration.Destination)
	}
}

func TestStaleHeartbeat(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.HostTTL = 30 * time.Second
	e.standard()
	e.clock.Advance(31 * time.Second)
	hosts, err := e.operator().ListHosts(t.Context(), &broker.ListHostsRequest{All: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts.Hosts {
		if h.Live {
			t.Errorf("host %s live after its heartbeat went stale", h.Host)
		}
	}
	if _, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm}); !errors.Is(err, broker.ErrFailedPrecondition) {
		t.Errorf("migration from a stale host: %v, want ErrFailedPrecondition", err)
	}
}

// TestAdoptAgainReissues: adopting a guest again on the host where it lives reissues the
// current epoch's key to that host's agent (it restarted and lost it); on another host it
// reissues nothing.
func TestAdoptAgainReissues(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	ctx := t.Context()
	c := e.tenant(tenant)
	if _, err := c.AdoptGuest(ctx, &broker.AdoptGuestRequest{VM: vm, Host: "h2"}); !errors.Is(err, broker.ErrConflict) {
		t.Errorf("adopting the guest on another host: %v, want ErrConflict", err)
	}
	if n := len(e.kb.Reissues()); n != 0 {
		t.Fatalf("%d reissues after adopting on another host, want 0", n)
	}
	g, err := c.AdoptGuest(ctx, &broker.AdoptGuestRequest{VM: vm, Host: "h1"})
	if err != nil {
		t.Fatalf("adopting the guest again on its own host: %v", err)
	}
	if g.Host != "h1" || g.Epoch != 1 {
		t.Errorf("guest on %s at epoch %d, want h1 at epoch 1", g.Host, g.Epoch)
	}
	re := e.kb.Reissues()
	if len(re) != 1 || re[0].Tenant != tenant || re[0].VM != vm || re[0].Host.Name != "h1" {
		t.Fatalf("reissues %+v, want one for %s/%s on h1", re, tenant, vm)
	}
	if n := e.agents["h1"].CallCount(agentapi.OpKeys, re[0].ReissueID); n != 1 {
		t.Errorf("h1 got the reissued key %d times, want 1", n)
	}
}

// TestDowntimeAndTimeline checks a committed migration's record carries the downtime and
// rounds its source reported, the timeline of every phase it entered, and the downtime limit
// the tenant's policy tightened; and that the event of the Committed phase carries the
// downtime.
func TestDowntimeAndTimeline(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.MaxDowntime = 300 * time.Millisecond
	e.kb.MaxDowntime = 100 * time.Millisecond
	e.standard()
	e.agents["h1"].AutoCommit = true
	nc := e.srv.Connect(t)
	committed := make(chan broker.Event, 1)
	_, err := nc.Subscribe(broker.EventsSubjectPrefix+".>", func(m *nats.Msg) {
		var ev broker.Event
		if json.Unmarshal(m.Data, &ev) == nil && ev.Kind == broker.EventPhase && ev.Phase == broker.PhaseCommitted {
			committed <- ev
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	resp, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	m, err := e.tenant(tenant).GetMigration(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]any{agentapitest.FakeDowntime, agentapi.DowntimeAgent, agentapitest.FakeRounds, 100 * time.Millisecond},
		[]any{m.Downtime, m.DowntimeSource, m.Rounds, m.MaxDowntime}); diff != "" {
		t.Errorf("downtime, its source, rounds, limit (-want +got):\n%s", diff)
	}
	var phases []broker.Phase
	for i, p := range m.Timeline {
		phases = append(phases, p.Phase)
		last := i == len(m.Timeline)-1
		if p.Entered.IsZero() || (last && p.Duration != 0) || (!last && p.Duration < 0) {
			t.Errorf("timeline entry %d = %+v", i, p)
		}
		if !last && !p.Entered.Add(p.Duration).Equal(m.Timeline[i+1].Entered) {
			t.Errorf("timeline entry %d ends at %v, the next begins at %v", i, p.Entered.Add(p.Duration), m.Timeline[i+1].Entered)
		}
	}
	want := []broker.Phase{broker.PhaseRequested, broker.PhaseAttesting, broker.PhaseKeysReleased,
		broker.PhaseTransferring, broker.PhaseCuttingOver, broker.PhaseCommitted, broker.PhaseErased}
	if diff := cmp.Diff(want, phases); diff != "" {
		t.Errorf("timeline (-want +got):\n%s", diff)
	}
	r, err := e.tenant(tenant).GetReceipt(ctx, id)
	if err != nil || r.Downtime != agentapitest.FakeDowntime {
		t.Errorf("receipt %+v, %v; want its metadata to carry the downtime", r, err)
	}
	select {
	case ev := <-committed:
		if ev.Downtime != agentapitest.FakeDowntime {
			t.Errorf("Committed event downtime = %v, want %v", ev.Downtime, agentapitest.FakeDowntime)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no Committed event")
	}
}

// TestTransferCarriesTheDestinationsLanes: the lanes the destination says it accepts when it
// prepares reach the source with the transfer request, so that a source set to more multifd
// channels carries no more than the destination takes.
func TestTransferCarriesTheDestinationsLanes(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true
	e.agents["h2"].Lanes = 3
	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	req, ok := e.agents["h1"].TransferRequest(id)
	if !ok || req.Lanes != 3 {
		t.Errorf("the source's transfer request (received %v) has %d lanes, want the destination's 3", ok, req.Lanes)
	}
}
