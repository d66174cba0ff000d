package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// scn is one scenario as it runs: what it started and what it expects the system to look like
// at the end.
type scn struct {
	*env
	t      *testing.T
	index  int
	start  captureMark
	guests map[string]*guestWant
	migs   []migWant
	audits []auditWant
	// vmPolicies are the VMs the scenario gave a policy of their own.
	vmPolicies map[string]bool
	// outcome says what happened, for the report.
	outcome string
	// noProbe lists guests whose liveness cannot be probed with a migration, and why.
	noProbe map[string]string
	// committedBytes is the guest memory the committed migrations moved.
	committedBytes int64
}

// guestWant is where a guest must be at the end.
type guestWant struct {
	vm      string
	at      *agent
	adopted bool
}

// migWant is how a migration must have ended.
type migWant struct {
	id      string
	outcome string // broker.OutcomeErased or broker.OutcomeAborted
	src     *agent
	dst     *agent
}

// auditWant is an audit event a scenario caused outside the broker (a direct keybroker call).
type auditWant struct {
	id       string
	kind     keybroker.EventKind
	decision keybroker.Decision
}

// vm names a guest of the scenario.
func (s *scn) vm(suffix string) string { return fmt.Sprintf("s%02d-%s", s.index, suffix) }

// agent starts an agent process for the scenario.
func (s *scn) agent(spec agentSpec) *agent {
	s.t.Helper()
	a := s.startAgent(s.t, spec)
	for _, g := range spec.guests {
		s.guests[g] = &guestWant{vm: g, at: a}
	}
	return a
}

// adopt adopts vm on a.
func (s *scn) adopt(vm string, a *agent) {
	s.t.Helper()
	g, err := s.demo.AdoptGuest(s.t.Context(), &broker.AdoptGuestRequest{VM: vm, Host: a.host})
	if err != nil {
		s.t.Fatalf("adopting %s on %s: %v", vm, a.host, err)
	}
	if g.Epoch != 1 || g.Host != a.host {
		s.t.Fatalf("adopted %s: %+v", vm, g)
	}
	s.guests[vm].adopted = true
}

// policy applies a policy of vm's own, signed with the tenant's key.
func (s *scn) policy(vm string, y []byte) error {
	s.vmPolicies[vm] = true
	_, err := s.demo.ApplyPolicy(s.t.Context(), &broker.ApplyPolicyRequest{VM: vm, Envelope: s.sign(y, s.demoKey)})
	return err
}

// migrate asks for a migration of vm to dst.
func (s *scn) migrate(vm string, dst *agent) string {
	s.t.Helper()
	id, err := s.tryMigrate(vm, dst)
	if err != nil {
		s.t.Fatalf("migrating %s to %s: %v", vm, dst.host, err)
	}
	return id
}

func (s *scn) tryMigrate(vm string, dst *agent) (string, error) {
	resp, err := s.demo.CreateMigration(s.t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: dst.host})
	if err != nil {
		return "", err
	}
	return resp.Migration.ID, nil
}

// end waits for migration id to end.
func (s *scn) end(id string) *broker.Migration {
	s.t.Helper()
	return s.watchMigration(s.t, id, func(m *broker.Migration) bool { return m.Phase.Terminal() })
}

// phase waits for migration id to reach phase.
func (s *scn) phase(id string, p broker.Phase) *broker.Migration {
	s.t.Helper()
	return s.watchMigration(s.t, id, func(m *broker.Migration) bool { return m.Phase == p || m.Phase.Terminal() })
}

// expect records how a migration of vm must end, and where vm must then be.
func (s *scn) expect(id, vm, outcome string, src, dst *agent) {
	s.migs = append(s.migs, migWant{id: id, outcome: outcome, src: src, dst: dst})
	if outcome == broker.OutcomeErased || outcome == broker.OutcomeCommittedUnverifiedErasure {
		s.guests[vm].at = dst
	}
}

// requireEnd waits for the migration to end, requires the outcome and records the expectation.
func (s *scn) requireEnd(id, vm, outcome string, src, dst *agent) *broker.Migration {
	s.t.Helper()
	m := s.end(id)
	s.expect(id, vm, outcome, src, dst)
	if m.Outcome != outcome {
		s.t.Fatalf("migration %s of %s ended %s (phase %s, reason %q, notes %q), want %s", id, vm, m.Outcome, m.Phase, m.AbortReason, m.Notes, outcome)
	}
	return m
}

// check verifies the invariants and returns what does not hold.
func (s *scn) check() []string {
	var bad []string
	fail := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }
	ctx := s.t.Context()

	// Guests: in exactly one place, where expected; one live epoch key each.
	keys, err := s.transitKeys(ctx)
	if err != nil {
		fail("%v", err)
	}
	for _, vm := range sortedKeys(s.guests) {
		g := s.guests[vm]
		want := g.at.host
		err := pollErr(ctx, waitLimit, func() (bool, string) {
			recs, err := s.hostRecords(ctx)
			if err != nil {
				return false, err.Error()
			}
			var on []string
			for _, r := range recs {
				if r.Guest(demoTenant, vm) != nil && time.Since(r.Heartbeat) < hostTTL {
					on = append(on, r.Host)
				}
			}
			if len(on) != 1 || on[0] != want {
				return false, fmt.Sprintf("guest %s is on live hosts %v, want only %s", vm, on, want)
			}
			return true, ""
		})
		if err != nil {
			fail("%v", err)
		}
		rec, ok, err := getKV[broker.Guest](ctx, s.js, broker.GuestsBucket, broker.GuestKey(demoTenant, vm))
		var epochKeys []string
		for _, k := range keys {
			if strings.HasPrefix(k, "lethe-"+demoTenant+"-"+vm+"-e") {
				epochKeys = append(epochKeys, k)
			}
		}
		switch {
		case err != nil:
			fail("%v", err)
		case !g.adopted:
			if ok {
				fail("guest %s has a guest record but was never adopted: %+v", vm, rec)
			}
			if len(epochKeys) != 0 {
				fail("guest %s was never adopted but has epoch keys %v", vm, epochKeys)
			}
		case !ok:
			fail("guest %s has no guest record", vm)
		default:
			if rec.Host != want || rec.Migration != "" {
				fail("guest record of %s: host %s, migration %q; want host %s and no migration", vm, rec.Host, rec.Migration, want)
			}
			bad = append(bad, s.checkHistory(vm, rec.Epoch)...)
			if wantKey := fmt.Sprintf("lethe-%s-%s-e%d", demoTenant, vm, rec.Epoch); !slices.Equal(epochKeys, []string{wantKey}) {
				fail("epoch keys of %s: %v, want exactly [%s]", vm, epochKeys, wantKey)
			}
		}
	}

	// Migrations: ended as expected, keys gone, receipts verify, audit complete, states of
	// the agents.
	for _, w := range s.migs {
		bad = append(bad, s.checkMigration(w, keys)...)
	}
	for _, w := range s.audits {
		if !hasEvent(s.audit.of(w.id), w.kind, w.decision) {
			fail("no %s/%s audit event for %s", w.kind, w.decision, w.id)
		}
	}

	return bad
}

// checkHistory verifies a guest's residency log as its tenant does: read over the tenant's
// own NATS connection, every entry in the log signed by the keybroker's key, the chain
// complete from the adoption, no migration of it left released, the live epoch the one the
// broker records, and an ending entry for every migration of the scenario that released keys.
func (s *scn) checkHistory(vm string, epoch uint64) []string {
	var bad []string
	fail := func(format string, args ...any) {
		bad = append(bad, fmt.Sprintf("history of %s: "+format, append([]any{vm}, args...)...))
	}
	ctx := s.t.Context()
	h, err := kbclient.New(s.demoNC, 20*time.Second).LogHistory(ctx, demoTenant, vm, false)
	if err != nil {
		return []string{fmt.Sprintf("history of %s: %v", vm, err)}
	}
	v, err := tlog.LogVerifier(s.logOrigin(), s.kbPub)
	if err != nil {
		return []string{err.Error()}
	}
	cp, err := tlog.Open(h.Checkpoint, v, nil, 0)
	if err != nil {
		return []string{fmt.Sprintf("history of %s: %v", vm, err)}
	}
	rep, err := tlog.VerifyHistory(cp, h)
	if err != nil {
		fail("%v", err)
	}
	if rep == nil {
		return bad
	}
	if rep.Live != epoch {
		fail("live epoch %d, the broker's record says %d", rep.Live, epoch)
	}
	if len(rep.InProgress) > 0 {
		fail("migrations %v released and never ended", rep.InProgress)
	}
	for _, w := range s.migs {
		m, err := s.migration(ctx, w.id)
		if err != nil || m.VM != vm || m.SourceEvidence == "" {
			continue
		}
		if !slices.ContainsFunc(rep.Entries, func(e *tlog.Entry) bool {
			return e.MigrationID == w.id && e.Outcome == w.outcome && (e.Kind == tlog.KindCommit || e.Kind == tlog.KindAbort)
		}) {
			fail("no %s ending of migration %s", w.outcome, w.id)
		}
	}
	return bad
}

// checkReceiptLogged verifies a receipt's log proof as lethectl receipt verify
// --require-logged does: the checkpoint signed by the keybroker's key, the ending's entry in
// it, naming this very receipt.
func (s *scn) checkReceiptLogged(raw []byte, id string, env *receipt.Envelope) error {
	if len(raw) == 0 {
		return fmt.Errorf("none")
	}
	var inc tlog.Inclusion
	if err := json.Unmarshal(raw, &inc); err != nil {
		return err
	}
	v, err := tlog.LogVerifier(s.logOrigin(), s.kbPub)
	if err != nil {
		return err
	}
	cp, err := tlog.Open(inc.Checkpoint, v, nil, 0)
	if err != nil {
		return err
	}
	_, err = tlog.VerifyReceipt(cp, &inc, id, env.Payload)
	return err
}

// checkWire verifies that no plaintext page crossed the data plane and that the capture saw
// at least the memory of the committed migrations.
func (s *scn) checkWire() []string {
	var bad []string
	fail := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }
	n, hits := s.capture.since(s.start)
	for _, h := range hits {
		fail("plaintext on the data plane: %s", h)
	}
	if n < s.committedBytes {
		fail("the capture saw %d data-plane bytes, less than the %d bytes of guest memory committed", n, s.committedBytes)
	}
	if d := s.capture.drops(); d > 0 {
		fail("the capture dropped %d packets", d)
	}
	return bad
}

func (s *scn) checkMigration(w migWant, keys []string) []string {
	var bad []string
	fail := func(format string, args ...any) {
		bad = append(bad, fmt.Sprintf("migration %s: "+format, append([]any{w.id}, args...)...))
	}
	ctx := s.t.Context()
	m, err := s.migration(ctx, w.id)
	if err != nil {
		return []string{err.Error()}
	}
	committed := w.outcome == broker.OutcomeErased || w.outcome == broker.OutcomeCommittedUnverifiedErasure
	if committed {
		s.committedBytes += int64(m.MemoryBytes)
	}
	if !m.Phase.Terminal() || m.Outcome != w.outcome {
		fail("phase %s, outcome %q; want %s", m.Phase, m.Outcome, w.outcome)
	}
	if slices.Contains(keys, "lethe-mig-"+w.id) {
		fail("its Vault key lethe-mig-%s remains", w.id)
	}
	r, err := s.demo.GetReceipt(ctx, w.id)
	if err != nil {
		fail("getting the receipt: %v", err)
	} else if env, err := receipt.Parse(r.Envelope); err != nil {
		fail("parsing the receipt: %v", err)
	} else if rc, err := receipt.Verify(env, s.kbPub); err != nil {
		fail("the receipt does not verify offline: %v", err)
	} else if string(rc.Outcome) != w.outcome || rc.MigrationID != w.id || rc.VM != m.VM || rc.Tenant != demoTenant {
		fail("receipt states %s of %s (%s/%s), want %s", rc.Outcome, rc.MigrationID, rc.Tenant, rc.VM, w.outcome)
	} else if err := s.checkReceiptLogged(r.Log, w.id, env); err != nil {
		fail("the receipt's log proof: %v", err)
	}

	evs := s.audit.of(w.id)
	released := m.SourceEvidence != ""
	if released && !hasEvent(evs, keybroker.EventRelease, keybroker.DecisionAllow) {
		fail("keys were released without a release/allow audit event")
	}
	if released && !hasEvent(evs, keybroker.EventDestroy, keybroker.DecisionAllow) {
		fail("keys were released but no destroy/allow audit event")
	}
	if strings.Contains(m.AbortReason, "denied") && !hasEvent(evs, keybroker.EventRelease, keybroker.DecisionDeny) {
		fail("denied (%s) without a release/deny audit event", m.AbortReason)
	}

	alive := func(a *agent) bool { return a != nil && a.proc.running() }
	switch w.outcome {
	case broker.OutcomeErased, broker.OutcomeCommittedUnverifiedErasure:
		if m.Progress == nil || len(m.Progress.MemoryDigest) != 32 {
			fail("no memory digest in the record")
			break
		}
		st, err := s.agents.Status(ctx, w.dst.host, &agentapi.StatusRequest{MigrationID: w.id})
		switch {
		case err != nil:
			fail("destination status: %v", err)
		case st.Transfer == nil || st.Transfer.Phase != agentapi.TransferCommitted || !bytes.Equal(st.Transfer.MemoryDigest, m.Progress.MemoryDigest):
			fail("destination memory %+v differs from the source's at cutover %x", st.Transfer, m.Progress.MemoryDigest)
		case st.KeysHeld:
			fail("the destination holds migration keys after the commit")
		}
		if alive(w.src) {
			st, err := s.agents.Status(ctx, w.src.host, &agentapi.StatusRequest{MigrationID: w.id})
			if err != nil || st.KeysHeld || (st.Known && !st.Erased) {
				fail("source after commit: %+v, %v; want erased, no keys", st, err)
			}
		}
	case broker.OutcomeAborted, broker.OutcomeAbortedUnverifiedErasure:
		for _, a := range []*agent{w.src, w.dst} {
			if !alive(a) {
				continue
			}
			st, err := s.agents.Status(ctx, a.host, &agentapi.StatusRequest{MigrationID: w.id})
			if err != nil || st.KeysHeld || (st.Known && !st.Aborted) {
				fail("%s after abort: %+v, %v; want aborted, no keys", a.host, st, err)
			}
		}
	}
	return bad
}

func hasEvent(evs []keybroker.Event, kind keybroker.EventKind, d keybroker.Decision) bool {
	return slices.ContainsFunc(evs, func(ev keybroker.Event) bool { return ev.Kind == kind && ev.Decision == d })
}

// probe shows that every adopted guest runs where it is: it migrates the guest to a spare host
// of the same platform, which must commit having sent pages again that the guest wrote during
// pre-copy, and checks that migration's invariants too.
func (s *scn) probe() []string {
	var bad []string
	for _, vm := range sortedKeys(s.guests) {
		g := s.guests[vm]
		if why, skip := s.noProbe[vm]; skip || !g.adopted {
			if !g.adopted {
				why = "never adopted"
			}
			s.t.Logf("no liveness probe of %s: %s", vm, why)
			continue
		}
		if s.vmPolicies[vm] {
			if err := s.policy(vm, s.basePolicy); err != nil {
				bad = append(bad, fmt.Sprintf("re-applying the base policy to %s: %v", vm, err))
				continue
			}
		}
		// A guest that does not run is sent once, page by page; one that runs dirties pages
		// during pre-copy, which are sent again. On a loaded machine a running guest's
		// workload can miss one short pre-copy round, so a guest is taken for dead only if it
		// wrote nothing during two migrations in a row.
		for attempt := 1; ; attempt++ {
			spec := g.at.spec
			spare := s.startAgent(s.t, agentSpec{platform: spec.platform, tcb: spec.tcb, labels: spec.labels})
			id, err := s.tryMigrate(vm, spare)
			if err != nil {
				bad = append(bad, fmt.Sprintf("probe of %s: %v", vm, err))
				break
			}
			m := s.end(id)
			if m.Outcome != broker.OutcomeErased {
				bad = append(bad, fmt.Sprintf("probe of %s from %s: %s (%s)", vm, g.at.host, m.Outcome, m.AbortReason))
				break
			}
			src := g.at
			s.expect(id, vm, broker.OutcomeErased, src, spare)
			keys, err := s.transitKeys(s.t.Context())
			if err != nil {
				bad = append(bad, err.Error())
			}
			bad = append(bad, s.checkMigration(s.migs[len(s.migs)-1], keys)...)
			pages := m.MemoryBytes / 4096
			if m.Progress != nil && m.Progress.Pages > pages {
				break
			}
			if attempt == 2 {
				bad = append(bad, fmt.Sprintf("probe of %s: %+v pages sent for %d pages of memory, twice: the guest wrote nothing, it does not run on %s", vm, m.Progress, pages, src.host))
				break
			}
			s.t.Logf("probe of %s: it wrote nothing while leaving %s; probing once more", vm, src.host)
		}
	}
	return bad
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// row is one line of the report.
type row struct {
	scenario, outcome, invariants string
}

var (
	reportMu sync.Mutex
	report   []row
)

func addRow(r row) {
	reportMu.Lock()
	report = append(report, r)
	reportMu.Unlock()
}

// printReport prints the table of scenarios that ran.
func printReport(w io.Writer) {
	reportMu.Lock()
	defer reportMu.Unlock()
	if len(report) == 0 {
		return
	}
	ws := [3]int{len("scenario"), len("outcome"), len("invariants held")}
	for _, r := range report {
		ws[0], ws[1] = max(ws[0], len(r.scenario)), max(ws[1], min(len(r.outcome), 90))
	}
	line := func(a, b, c string) {
		if len(b) > 90 {
			b = b[:87] + "..."
		}
		fmt.Fprintf(w, "| %-*s | %-*s | %-*s |\n", ws[0], a, ws[1], b, ws[2], c)
	}
	fmt.Fprintln(w)
	line("scenario", "outcome", "invariants held")
	fmt.Fprintf(w, "|%s|%s|%s|\n", strings.Repeat("-", ws[0]+2), strings.Repeat("-", ws[1]+2), strings.Repeat("-", ws[2]+2))
	for _, r := range report {
		line(r.scenario, r.outcome, r.invariants)
	}
}
