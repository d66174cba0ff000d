package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"golang.org/x/sync/errgroup"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// errNotMine means the migration changed phase or owner under a step; the driver reloads it.
var errNotMine = errors.New("migration changed phase or owner")

// waitingCheck is how many CheckIntervals a migration waiting for admission waits before it
// looks again unwoken while the places of hosts are not watched (admission.go).
const waitingCheck = 5

// gib is the number of bytes in a GiB.
const gib = 1 << 30

// runDriver advances migration id for as long as this broker holds its lease and it is not
// finished. wake is signalled when the record changes.
func (b *Broker) runDriver(ctx context.Context, id string, wake <-chan struct{}) {
	log := b.log.With(logKeyMigration, id)
	retry := time.NewTicker(b.cfg.CheckInterval)
	defer retry.Stop()
	wait := func() {
		select {
		case <-ctx.Done():
		case <-wake:
		case <-retry.C:
		}
	}
	for ctx.Err() == nil {
		m, rev, err := getJSON[Migration](ctx, b.store.migrations, id)
		if errors.Is(err, ErrNotFound) {
			return
		}
		if err != nil {
			log.Warn("Reading migration failed", logKeyError, err)
			b.cfg.Metrics.NATSError(natsOpKVRead)
			wait()
			continue
		}
		if m.Phase.Terminal() {
			return
		}
		now := b.now()
		if m.Owner != "" && m.Owner != b.cfg.ID && m.LeaseUntil.After(now) {
			return // another broker holds it
		}
		lease := b.cfg.Lease
		if m.Phase == PhaseRequested && m.Waiting != "" {
			_, lease = b.waitingFor()
		}
		if m.Owner != b.cfg.ID || m.LeaseUntil.Sub(now) < lease/2 {
			prev := m.Owner
			m.Owner, m.LeaseUntil, m.Updated = b.cfg.ID, now.Add(lease), now
			if _, err := updateJSON(ctx, b.store.migrations, id, m, rev); err != nil {
				if !errors.Is(err, errRevision) {
					log.Warn("Claiming migration failed", logKeyError, err)
					wait()
				}
				continue
			}
			if prev != "" && prev != b.cfg.ID {
				log.Info("Took over migration", logKeyOwner, prev, logKeyPhase, m.Phase)
				b.publishEvent(Event{MigrationID: id, Kind: EventAudit, Phase: m.Phase, Message: "taken over from " + prev})
			}
			continue
		}
		if m.Phase.Abortable() {
			if reason := b.abortReason(ctx, m, now); reason != "" {
				if err := b.abort(ctx, m, reason); err != nil && !errors.Is(err, errNotMine) {
					log.Warn("Aborting migration failed", logKeyError, err)
					wait()
				}
				continue
			}
		}
		stepCtx, endStep := context.WithCancel(ctx)
		go b.holdLease(stepCtx, id)
		waitNext, err := b.step(stepCtx, m)
		endStep()
		switch {
		case err == nil:
		case errors.Is(err, errNotMine), errors.Is(err, errRevision):
			continue
		case errors.Is(err, errWaiting):
			// A place given back wakes the migrations it lets in; the others look again
			// now and then, and check their queue timeout.
			sleep, _ := b.waitingFor()
			b.setAsleep(id, true)
			select {
			case <-ctx.Done():
			case <-wake:
			case <-time.After(sleep):
			}
			b.setAsleep(id, false)
			continue
		case ctx.Err() != nil:
			return
		default:
			log.Warn("Migration step failed", logKeyPhase, m.Phase, logKeyError, err)
			waitNext = true
		}
		if waitNext {
			wait()
		}
	}
}

// step runs the step of m's phase. It returns true when the driver should wait for a change
// (progress) before looking again.
func (b *Broker) step(ctx context.Context, m *Migration) (bool, error) {
	switch m.Phase {
	case PhaseRequested:
		return false, b.stepAdmit(ctx, m)
	case PhaseAttesting:
		return false, b.stepAttest(ctx, m)
	case PhaseKeysReleased:
		return false, b.stepKeys(ctx, m)
	case PhaseTransferring, PhaseCuttingOver:
		return b.stepTransfer(ctx, m)
	case PhaseCommitted:
		return false, b.stepCommit(ctx, m)
	case PhaseAborting:
		return false, b.stepAbort(ctx, m)
	}
	return true, fmt.Errorf("unknown phase %q", m.Phase)
}

// transition moves migration id from phase from to phase to, applying mutate, if this broker
// still owns it in phase from. It renews the lease.
func (b *Broker) transition(ctx context.Context, id string, from, to Phase, mutate func(*Migration)) error {
	for {
		m, rev, err := getJSON[Migration](ctx, b.store.migrations, id)
		if err != nil {
			return err
		}
		if m.Phase != from || m.Owner != b.cfg.ID {
			return errNotMine
		}
		if mutate != nil {
			mutate(m)
		}
		now := b.now()
		inFrom := m.enter(to, now)
		m.LeaseUntil = now.Add(b.cfg.Lease)
		if to.Terminal() {
			m.Finished, m.Owner, m.LeaseUntil = now, "", time.Time{}
		}
		if _, err := updateJSON(ctx, b.store.migrations, id, m, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return err
		}
		attrs := []any{logKeyMigration, id, logKeyFrom, from, logKeyPhase, to}
		if to == PhaseAborting {
			attrs = append(attrs, logKeyReason, m.AbortReason)
		}
		b.log.Info("Migration phase changed", attrs...)
		b.cfg.Metrics.PhaseChanged(from, to, inFrom)
		b.tracePhase(ctx, m, from, to, now.Add(-inFrom), now)
		ev := Event{MigrationID: id, Kind: EventPhase, From: from, Phase: to, Message: m.AbortReason, InFrom: inFrom}
		if to == PhaseCommitted {
			ev.Downtime = m.Downtime
			if m.Downtime > 0 {
				b.cfg.Metrics.Downtime(m.Downtime)
			}
		}
		b.publishEvent(ev)
		if to.Terminal() {
			b.unwait(id)
			hosts := []string{m.Source, m.Destination}
			for _, a := range m.Attempts {
				hosts = append(hosts, a.Destination)
			}
			b.giveSlots(ctx, id, hosts...)
			// A fleet operation waiting for a slot starts its next migration now, not at
			// its next check.
			if op := opOf(m.RequestedBy); op != "" {
				b.driveOp(b.runCtx(), op)
			}
		}
		return nil
	}
}

// tracePhase records the phase from that m left at end as a span, and a terminal phase to as
// an instant one, so that a migration's trace holds every phase it went through whichever
// broker moved it. On the commit it records the source agent's transfer too (traceAgent):
// the transition to Committed happens once, where a committed report may arrive more than
// once.
func (b *Broker) tracePhase(ctx context.Context, m *Migration, from, to Phase, start, end time.Time) {
	if b.cfg.Tracer == nil {
		return
	}
	attrs := []attribute.KeyValue{
		attribute.String("lethe.source", m.Source), attribute.String("lethe.destination", m.Destination),
		attribute.String("lethe.next_phase", string(to)), attribute.String("lethe.broker", b.cfg.ID),
	}
	reason := ""
	if to == PhaseAborting {
		reason = m.AbortReason
	}
	b.cfg.Tracer.Phase(ctx, m.ID, string(from), start, end, reason, attrs...)
	if to == PhaseCommitted {
		b.traceAgent(ctx, m)
	}
	if to.Terminal() {
		b.cfg.Tracer.Phase(ctx, m.ID, string(to), end, end, "", attrs[:2]...)
	}
}

// traceAgent records the source agent's transfer of committed migration m from the agent's
// committed report: a span per pre-copy round it summarised and one for the guest's pause.
// The agent exports nothing itself (it links no OpenTelemetry); these spans hold only what it
// already reports to the broker, never its commit acknowledgement or memory digest.
//
// The report says how long each round and the pause took, not when. The rounds ran back to
// back and the commit report followed the final one, so they are laid out backwards from the
// report's Time, and the pause, Downtime long, ends there too. These times are the agent's
// clock, not the broker's, and the rounds are drawn later than they ran by the gap between
// the end of the final round and the report (the commit's exchange with the destination);
// a round's duration is the agent's own, its bytes over its throughput.
func (b *Broker) traceAgent(ctx context.Context, m *Migration) {
	p := m.Progress
	if p == nil || p.Phase != agentapi.TransferCommitted || p.Time.IsZero() {
		// No committed report, or one without a time to lay it out from. (Where an abort's
		// answer stands in for a lost report, it has no rounds and no downtime: nothing is
		// recorded either.)
		return
	}
	// The report is the source's word: a span per round within the wire's bound, none of
	// negative length.
	rounds := p.Rounds
	if len(rounds) > agentapi.MaxRounds {
		rounds = rounds[len(rounds)-agentapi.MaxRounds:]
	}
	source := attribute.String("lethe.source", m.Source)
	var sent time.Duration
	for _, r := range rounds {
		sent += max(r.Duration, 0)
	}
	start := p.Time.Add(-sent)
	for _, r := range rounds {
		name := fmt.Sprintf("agent round %d", r.Round)
		if r.Final {
			name = "agent final round"
		}
		end := start.Add(max(r.Duration, 0))
		b.cfg.Tracer.Phase(ctx, m.ID, name, start, end, "", source,
			attribute.Int("lethe.round", r.Round), attribute.Bool("lethe.final", r.Final),
			attribute.Int64("lethe.pages", int64(r.Pages)), attribute.Int64("lethe.bytes", int64(r.Bytes)),
			attribute.Float64("lethe.dirty_rate", r.DirtyRate), attribute.Float64("lethe.throughput", r.Throughput),
			attribute.Int("lethe.throttle", r.Throttle))
		start = end
	}
	// A source that measured no downtime (libvirt without the statistic) has no pause to draw.
	if p.Downtime > 0 {
		b.cfg.Tracer.Phase(ctx, m.ID, "agent cutover pause", p.Time.Add(-p.Downtime), p.Time, "", source,
			attribute.String("lethe.downtime_source", p.DowntimeSource), attribute.Bool("lethe.post_copy", p.PostCopy))
	}
}

// update applies mutate to migration id if this broker still owns it in phase, without
// changing the phase.
func (b *Broker) update(ctx context.Context, id string, phase Phase, mutate func(*Migration)) error {
	for {
		m, rev, err := getJSON[Migration](ctx, b.store.migrations, id)
		if err != nil {
			return err
		}
		if m.Phase != phase || m.Owner != b.cfg.ID {
			return errNotMine
		}
		mutate(m)
		m.Updated = b.now()
		if _, err := updateJSON(ctx, b.store.migrations, id, m, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return err
		}
		return nil
	}
}

// abort moves m to Aborting for reason.
func (b *Broker) abort(ctx context.Context, m *Migration, reason string) error {
	return b.transition(ctx, m.ID, m.Phase, PhaseAborting, func(m *Migration) { m.AbortReason = reason })
}

// abortReason returns why m must be aborted now (timeout, agent lost), or "".
func (b *Broker) abortReason(ctx context.Context, m *Migration, now time.Time) string {
	t := b.cfg.Timeouts
	switch m.Phase {
	case PhaseRequested:
		if reason := b.queueReason(m, now); reason != "" {
			return reason
		}
	case PhaseAttesting, PhaseKeysReleased:
		// The time counts from the admission; each fallback to another destination has the
		// whole time again.
		since := m.Created
		if m.Admitted.After(since) {
			since = m.Admitted
		}
		if n := len(m.Attempts); n > 0 && m.Attempts[n-1].At.After(since) {
			since = m.Attempts[n-1].At
		}
		if now.Sub(since) > t.Start {
			return fmt.Sprintf("timeout: transfer not started within %v", t.Start)
		}
	case PhaseTransferring, PhaseCuttingOver:
		last := m.TransferStarted
		if m.LastProgress.After(last) {
			last = m.LastProgress
		}
		if now.Sub(last) > t.Progress {
			return fmt.Sprintf("timeout: no progress for %v", t.Progress)
		}
		limit := max(t.Progress, time.Duration(float64(t.PerGiB)*float64(m.MemoryBytes)/gib))
		if now.Sub(m.TransferStarted) > limit {
			return fmt.Sprintf("timeout: transfer not complete within %v", limit.Round(time.Second))
		}
	}
	for _, h := range []string{m.Source, m.Destination} {
		if live, why := b.hostLive(ctx, h, now); !live {
			return "agent lost: " + why
		}
	}
	return ""
}

// hostLive reports whether host's record is present and its heartbeat fresh, and if not, why.
// A failure to read the bucket counts as live: the broker's own trouble is no reason to abort.
func (b *Broker) hostLive(ctx context.Context, host string, now time.Time) (bool, string) {
	rec, err := b.hostRecord(ctx, host)
	if errors.Is(err, ErrNotFound) {
		return false, fmt.Sprintf("host %s is not registered", host)
	}
	if err != nil {
		b.log.Warn("Reading host failed", logKeyHost, host, logKeyError, err)
		return true, ""
	}
	return b.fresh(rec, now)
}

func (b *Broker) fresh(rec *agentapi.HostRecord, now time.Time) (bool, string) {
	if age := now.Sub(rec.Heartbeat); age > b.cfg.HostTTL {
		return false, fmt.Sprintf("host %s heartbeat is %v old (TTL %v)", rec.Host, age.Round(time.Second), b.cfg.HostTTL)
	}
	return true, ""
}

// stepAttest gathers both agents' evidence under fresh nonces and asks the keybroker for the
// keys. Rerunning it asks for new nonces and evidence.
func (b *Broker) stepAttest(ctx context.Context, m *Migration) error {
	start := b.now()
	pol, _, err := b.policyFor(ctx, m.Tenant, m.VM)
	if errors.Is(err, ErrNotFound) {
		return b.abort(ctx, m, "no policy for the guest")
	}
	if err != nil {
		return err
	}
	var srcNonce, dstNonce *kbwire.NonceResponse
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) {
		srcNonce, err = b.kb.Nonce(gctx, &kbwire.NonceRequest{MigrationID: m.ID, Role: attest.RoleSource})
		return err
	})
	g.Go(func() (err error) {
		dstNonce, err = b.kb.Nonce(gctx, &kbwire.NonceRequest{MigrationID: m.ID, Role: attest.RoleDestination})
		return err
	})
	if err := g.Wait(); err != nil {
		return fmt.Errorf("getting nonces: %w", err)
	}
	var srcEv *attest.Evidence
	var prep *agentapi.PrepareResponse
	g, gctx = errgroup.WithContext(ctx)
	g.Go(func() (err error) {
		srcEv, err = b.agents.Attest(gctx, m.Source, &agentapi.AttestRequest{
			MigrationID: m.ID, Role: attest.RoleSource, Nonce: srcNonce.Nonce, Tenant: m.Tenant, VM: m.VM,
		})
		if err != nil {
			return fmt.Errorf("attesting source %s: %w", m.Source, err)
		}
		return nil
	})
	var prepErr error // the destination's own answer, read after Wait
	g.Go(func() (err error) {
		prep, err = b.agents.Prepare(gctx, m.Destination, &agentapi.PrepareRequest{
			MigrationID: m.ID, Nonce: dstNonce.Nonce, Tenant: m.Tenant, VM: m.VM, MemoryBytes: m.MemoryBytes,
		})
		if err != nil {
			prepErr = fmt.Errorf("preparing destination %s: %w", m.Destination, err)
			return prepErr
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		if errors.Is(prepErr, agentapi.ErrConflict) {
			// The destination refuses the guest (no room, its limit of migrations): as
			// with a denial, another candidate may take it.
			return b.denied(ctx, m, prepErr, "destination refused")
		}
		return err
	}
	if below, err := b.belowOpTCB(ctx, m, prep.Evidence); err != nil {
		return err
	} else if below != nil {
		return b.denied(ctx, m, below, "destination refused")
	}
	dstHost := kbwire.Host{Name: m.Destination}
	// The labels the policy judges are read from the bucket, not the view (hostview.go).
	if h, _, err := getJSON[agentapi.HostRecord](ctx, b.store.hosts, m.Destination); err == nil {
		dstHost.Labels, dstHost.Region = h.Labels, h.Region
	}
	rel, err := b.kb.Release(ctx, &kbwire.ReleaseRequest{
		MigrationID: m.ID, Tenant: m.Tenant, VM: m.VM, Policy: pol.Envelope,
		Source:          kbwire.Attestation{Nonce: srcNonce.Nonce, Evidence: srcEv},
		Destination:     kbwire.Attestation{Nonce: dstNonce.Nonce, Evidence: prep.Evidence},
		DestinationHost: dstHost, SourceHost: m.Source,
	})
	if errors.Is(err, ErrDenied) {
		return b.denied(ctx, m, err, "release denied")
	}
	if err != nil {
		return fmt.Errorf("releasing keys: %w", err)
	}
	if rel.FromEpoch != m.Epoch || rel.ToEpoch != m.Epoch+1 {
		return b.abort(ctx, m, fmt.Sprintf("keybroker released epochs %d→%d, want %d→%d", rel.FromEpoch, rel.ToEpoch, m.Epoch, m.Epoch+1))
	}
	err = b.transition(ctx, m.ID, PhaseAttesting, PhaseKeysReleased, func(m *Migration) {
		m.SourceKeys, m.DestinationKeys = rel.SealedSource, rel.SealedDestination
		m.NextWrappedMDK = rel.WrappedMDK
		m.ZeroPageElision = rel.ZeroPageElision
		m.MaxDowntime = agentapi.DowntimeLimit(b.cfg.MaxDowntime, rel.MaxDowntime)
		m.DataEndpoint, m.Grant = rel.DataEndpoint, rel.Grant
		m.Streams, m.DestinationLanes = b.cfg.Streams, prep.Lanes
		m.SourceEvidence, m.DestinationEvidence = digestHex(srcEv), digestHex(prep.Evidence)
	})
	if err == nil {
		b.cfg.Metrics.Handshake(b.now().Sub(start))
	}
	return err
}

// belowOpTCB returns a refusal when m was started by an operation that requires a minimum
// TCB (evacuate) and the destination's evidence states a TCB below it, or none. Placement
// read the TCB from the host's record, which its agent writes and may lie in; the evidence is
// what the keybroker verifies, so a destination that passes here and at the release is known
// to be at the operation's level. The error is reading the operation's.
func (b *Broker) belowOpTCB(ctx context.Context, m *Migration, ev *attest.Evidence) (below, err error) {
	id := opOf(m.RequestedBy)
	if id == "" {
		return nil, nil
	}
	op, _, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+id)
	if errors.Is(err, ErrNotFound) || (err == nil && op.MinTCB == nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading fleet operation %s: %w", id, err)
	}
	tcb, err := attest.PeekTCB(ev)
	if err != nil {
		return fmt.Errorf("the destination's evidence states no TCB, %s needs at least %s: %w", op.ID, op.MinTCB, err), nil
	}
	if at, comparable := tcb.AtLeast(*op.MinTCB); !comparable || !at {
		return fmt.Errorf("the destination's evidence states TCB %s, below the %s %s needs", tcb, op.MinTCB, op.ID), nil
	}
	return nil, nil
}

// denied answers the keybroker's denial err of the release to m's destination. With an
// untried candidate left, fewer than Config.MaxAttempts destinations tried, and a denial that
// is the destination's (not of the tenant or its policy as a whole), the migration falls back
// to that candidate: the denied destination is recorded as an attempt and told to drop its
// preparation, and the migration stays in Attesting, whose step runs again with fresh nonces
// and evidence. Otherwise the migration aborts.
//
// what names the refusal in events and the abort reason: "release denied" for the keybroker's,
// "destination refused" for an agent that cannot take the guest.
func (b *Broker) denied(ctx context.Context, m *Migration, err error, what string) error {
	now := b.now()
	tried := Attempt{Destination: m.Destination, Reason: denialReason(err), At: now}
	next, rest, skipped := "", m.Candidates, []string(nil)
	if destinationDenial(err) && len(m.Attempts)+1 < b.cfg.MaxAttempts {
		next, rest, skipped = b.nextCandidate(ctx, m, now)
	}
	if next == "" {
		b.publishEvent(Event{MigrationID: m.ID, Kind: EventAudit, Phase: m.Phase, Message: what + ": " + err.Error()})
		if len(m.Attempts) == 0 {
			return b.abort(ctx, m, err.Error())
		}
		return b.abort(ctx, m, deniedEverywhere(append(slices.Clone(m.Attempts), tried)))
	}
	denied := m.Destination
	err = b.update(ctx, m.ID, PhaseAttesting, func(m *Migration) {
		m.Attempts = append(m.Attempts, tried)
		m.Destination, m.Candidates = next, rest
		m.Notes = append(m.Notes, skipped...)
	})
	if err != nil {
		return err
	}
	b.moveSlot(ctx, m.ID, m.Tenant, denied, next)
	b.log.Info("Destination refused; trying the next one", logKeyMigration, m.ID, logKeyHost, denied, logKeyReason, tried.Reason, logKeyNext, next)
	b.publishEvent(Event{MigrationID: m.ID, Kind: EventAudit, Phase: m.Phase,
		Message: fmt.Sprintf("%s for %s: %s; trying %s", what, denied, tried.Reason, next)})
	// The record names the new destination first: a broker that stops here leaves the denied
	// one to the migration's end, which asks every denied destination that has not confirmed.
	if err := b.dropPreparation(ctx, m.ID, denied, what+": "+tried.Reason); err != nil {
		b.log.Warn("A denied destination did not drop its preparation", logKeyMigration, m.ID, logKeyHost, denied, logKeyError, err)
		return nil
	}
	return b.markDropped(ctx, m.ID, PhaseAttesting, []string{denied})
}

// destinationDenial reports whether denial err may be the destination's, so that another
// destination may be allowed: a rejected policy or an unknown tenant is refused everywhere.
func destinationDenial(err error) bool {
	return !errors.Is(err, kbwire.CodePolicyRejected) && !errors.Is(err, kbwire.CodeUnknownTenant)
}

// denialReason returns the keybroker's message of a denial (its decision and every failing
// rule), or the whole error when it carries none.
func denialReason(err error) string {
	if e, ok := errors.AsType[*wireerr.Error](err); ok && e.Message != "" {
		return e.Message
	}
	return err.Error()
}

// deniedEverywhere is the abort reason of a migration whose every destination was denied.
func deniedEverywhere(attempts []Attempt) string {
	parts := make([]string, len(attempts))
	for i, a := range attempts {
		parts[i] = a.Destination + ": " + a.Reason
	}
	return fmt.Sprintf("release denied for each of %d destinations: %s", len(attempts), strings.Join(parts, "; "))
}

// nextCandidate returns the first of m's candidates that is neither the source nor a
// destination already tried, whose host is live and not cordoned, the candidates after it,
// and a note for each candidate passed over. It returns "" when none is left.
func (b *Broker) nextCandidate(ctx context.Context, m *Migration, now time.Time) (string, []string, []string) {
	var notes []string
	for i, h := range m.Candidates {
		tried := h == m.Source || h == m.Destination || slices.ContainsFunc(m.Attempts, func(a Attempt) bool { return a.Destination == h })
		if tried {
			continue
		}
		if live, why := b.hostLive(ctx, h, now); !live {
			notes = append(notes, "candidate destination passed over: "+why)
			continue
		}
		// Placement ranked the candidates when the migration was created: a host the
		// operator cordoned or drains since takes no new guest.
		if st, _, err := getJSON[HostStateRecord](ctx, b.store.fleet, hostStatePrefix+h); err == nil && st.State != HostSchedulable {
			notes = append(notes, fmt.Sprintf("candidate destination passed over: host %s is %s by %s", h, st.State, st.By))
			continue
		}
		return h, slices.Clone(m.Candidates[i+1:]), notes
	}
	return "", nil, notes
}

// dropPreparation tells host, a destination the keybroker denied, to drop what it prepared
// for migration id: its HPKE key, its data-plane listener and receive region. No key was
// released to it. An agent that never heard of the migration has nothing to drop.
func (b *Broker) dropPreparation(ctx context.Context, id, host, reason string) error {
	_, err := b.agents.Abort(ctx, host, &agentapi.AbortRequest{MigrationID: id, Reason: reason})
	if err != nil && !errors.Is(err, agentapi.ErrNotFound) {
		return fmt.Errorf("aborting on denied destination %s: %w", host, err)
	}
	return nil
}

// dropDenied asks each denied destination of m that has not confirmed it to drop its
// preparation. It returns those that confirmed and a note for each that did not.
func (b *Broker) dropDenied(ctx context.Context, m *Migration) (dropped, notes []string) {
	for _, a := range m.Attempts {
		if a.Dropped {
			continue
		}
		if err := b.dropPreparation(ctx, m.ID, a.Destination, "release denied: "+a.Reason); err != nil {
			notes = append(notes, fmt.Sprintf("denied destination %s did not confirm it dropped its preparation: %v", a.Destination, err))
			continue
		}
		dropped = append(dropped, a.Destination)
	}
	return dropped, notes
}

// markDropped records that hosts, denied destinations of migration id, dropped their
// preparation.
func (b *Broker) markDropped(ctx context.Context, id string, phase Phase, hosts []string) error {
	if len(hosts) == 0 {
		return nil
	}
	return b.update(ctx, id, phase, func(m *Migration) { setDropped(m, hosts) })
}

func setDropped(m *Migration, hosts []string) {
	for i := range m.Attempts {
		if slices.Contains(hosts, m.Attempts[i].Destination) {
			m.Attempts[i].Dropped = true
		}
	}
}

// stepKeys delivers the sealed keys to both agents (idempotent) and starts the transfer phase.
func (b *Broker) stepKeys(ctx context.Context, m *Migration) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return b.agents.Keys(gctx, m.Source, &agentapi.KeysRequest{MigrationID: m.ID, Role: attest.RoleSource, SealedKeys: m.SourceKeys, Grant: m.Grant})
	})
	g.Go(func() error {
		return b.agents.Keys(gctx, m.Destination, &agentapi.KeysRequest{MigrationID: m.ID, Role: attest.RoleDestination, SealedKeys: m.DestinationKeys, Grant: m.Grant})
	})
	if err := g.Wait(); err != nil {
		return fmt.Errorf("delivering keys: %w", err)
	}
	return b.transition(ctx, m.ID, PhaseKeysReleased, PhaseTransferring, func(m *Migration) {
		now := b.now()
		m.TransferStarted, m.LastProgress = now, now
	})
}

// stepTransfer (re-)attaches to the source's transfer once per driver and follows its
// progress: cutover, committed, or failed.
func (b *Broker) stepTransfer(ctx context.Context, m *Migration) (bool, error) {
	b.mu.Lock()
	attached := b.attached[m.ID]
	b.mu.Unlock()
	if !attached {
		p, err := b.agents.Transfer(ctx, m.Source, &agentapi.TransferRequest{
			MigrationID: m.ID, Tenant: m.Tenant, VM: m.VM, DataEndpoint: m.DataEndpoint,
			Streams: m.Streams, ZeroPageElision: m.ZeroPageElision, MaxDowntime: m.MaxDowntime,
			Lanes: m.DestinationLanes,
		})
		if err != nil {
			return true, fmt.Errorf("starting transfer on %s: %w", m.Source, err)
		}
		b.mu.Lock()
		b.attached[m.ID] = true
		b.mu.Unlock()
		p.MigrationID = m.ID
		if _, err := b.recordProgress(ctx, m.ID, m.Source, p); err != nil {
			return true, err
		}
		return false, nil
	}
	if m.Progress == nil {
		return true, nil
	}
	switch m.Progress.Phase {
	case agentapi.TransferCutover:
		if m.Phase == PhaseTransferring {
			return false, b.transition(ctx, m.ID, PhaseTransferring, PhaseCuttingOver, nil)
		}
	case agentapi.TransferCommitted:
		if m.Phase == PhaseTransferring {
			// The cutover happened even if its report was overtaken: record it.
			return false, b.transition(ctx, m.ID, PhaseTransferring, PhaseCuttingOver, nil)
		}
		return false, b.transition(ctx, m.ID, PhaseCuttingOver, PhaseCommitted, func(m *Migration) {
			if m.Progress != nil {
				m.CommitAck = m.Progress.CommitAck
				m.Downtime, m.DowntimeSource, m.Rounds = m.Progress.Downtime, m.Progress.DowntimeSource, m.Progress.Rounds
			}
		})
	case agentapi.TransferFailed:
		return false, b.abort(ctx, m, "transfer failed: "+m.Progress.Error)
	}
	return true, nil
}

// stepCommit erases the source, has the keybroker destroy the source's keys and sign the
// receipt, stores the receipt and moves the guest to the destination. Every part is
// idempotent.
func (b *Broker) stepCommit(ctx context.Context, m *Migration) error {
	var note string
	req := &kbwire.DestroyRequest{MigrationID: m.ID, Tenant: m.Tenant, VM: m.VM, Ending: kbwire.Commit, CommitAck: m.CommitAck}
	ev, nonce, err := b.erasureEvidence(ctx, m, m.Source)
	unresolved := false
	switch {
	case err == nil:
		req.Erasure = &kbwire.Attestation{Nonce: nonce, Evidence: ev}
		if m.ErasureRefused != "" {
			// The keybroker refused this source's erasure evidence before (the tenant's
			// policy does not accept it): the commit goes on, the receipt says the erasure is
			// unproven, with the policy's reasons.
			req.UnverifiedErasure = true
			note = "the source's erasure evidence was not accepted: " + m.ErasureRefused
		}
	case errors.Is(err, agentapi.ErrConflict):
		// The source sent its FIN but never got the acknowledgement (the destination's abort
		// answer brought it): it keeps the guest paused and cannot attest an erasure. The
		// commit's receipt tells it to drop its copy.
		unresolved = true
		req.UnverifiedErasure = true
		note = "the source never received the commit acknowledgement: its erasure is not attested"
	default:
		live, why := b.hostLive(ctx, m.Source, b.now())
		if live {
			return fmt.Errorf("getting the source's erasure evidence: %w", err)
		}
		// The source is gone: destroying its keys still erases what it kept.
		req.UnverifiedErasure = true
		note = "source lost before erasure evidence (" + why + "); its keys are destroyed"
	}
	resp, err := b.kb.Destroy(ctx, req)
	if e, ok := errors.AsType[*wireerr.Error](err); ok && e.Code == kbwire.CodeErasureRejected && !req.UnverifiedErasure {
		b.log.Warn("The keybroker refused the source's erasure evidence; committing with an unverified erasure", logKeyMigration, m.ID, logKeyError, err)
		return b.update(ctx, m.ID, PhaseCommitted, func(m *Migration) { m.ErasureRefused = e.Message })
	}
	if err != nil {
		return fmt.Errorf("destroying keys after commit: %w", err)
	}
	outcome, err := receiptOutcome(resp.Receipt)
	if err != nil {
		return err
	}
	if unresolved {
		if _, err := b.agents.Abort(ctx, m.Source, &agentapi.AbortRequest{MigrationID: m.ID, Reason: "committed", Receipt: resp.Receipt}); err != nil {
			note += fmt.Sprintf("; the source did not take the commit receipt: %v", err)
		}
	}
	if err := b.storeReceipt(ctx, m, outcome, resp); err != nil {
		return err
	}
	if err := b.moveGuest(ctx, m); err != nil {
		return err
	}
	dropped, dropNotes := b.dropDenied(ctx, m)
	return b.transition(ctx, m.ID, PhaseCommitted, PhaseErased, func(m *Migration) {
		m.ErasureEvidence = digestHex(ev)
		m.Outcome = outcome
		if note != "" {
			m.Notes = append(m.Notes, note)
		}
		m.Notes = append(m.Notes, dropNotes...)
		setDropped(m, dropped)
	})
}

// stepAbort resumes the guest at the source, scrubs the destination, has the keybroker destroy
// the migration's keys and sign the abort receipt, and frees the guest. A source that already
// holds the commit acknowledgement turns the abort into a commit.
func (b *Broker) stepAbort(ctx context.Context, m *Migration) error {
	var notes []string
	src, err := b.agents.Abort(ctx, m.Source, &agentapi.AbortRequest{MigrationID: m.ID, Reason: m.AbortReason})
	unresolved := false
	switch {
	case err != nil && !errors.Is(err, agentapi.ErrNotFound):
		notes = append(notes, fmt.Sprintf("source %s did not confirm the abort: %v", m.Source, err))
	case err == nil && src.Committed:
		return b.abortBecameCommit(ctx, m, "source", src)
	case err == nil && src.Unresolved:
		unresolved = true
	}
	dst, err := b.agents.Abort(ctx, m.Destination, &agentapi.AbortRequest{MigrationID: m.ID, Reason: m.AbortReason})
	switch {
	case err == nil && dst.Committed:
		return b.abortBecameCommit(ctx, m, "destination", dst)
	case err != nil && !errors.Is(err, agentapi.ErrNotFound):
		notes = append(notes, fmt.Sprintf("destination %s did not confirm the abort: %v", m.Destination, err))
	}
	dropped, dropNotes := b.dropDenied(ctx, m)
	notes = append(notes, dropNotes...)
	// The keybroker destroys the destination's keys only with its evidence that it erased
	// what it received and never resumed the guest, or, for a destination lost for good, with
	// a receipt that says that is unproven.
	req := &kbwire.DestroyRequest{MigrationID: m.ID, Tenant: m.Tenant, VM: m.VM, Ending: kbwire.Abort}
	ev, nonce, err := b.erasureEvidence(ctx, m, m.Destination)
	switch {
	case err == nil:
		req.Erasure = &kbwire.Attestation{Nonce: nonce, Evidence: ev}
	case errors.Is(err, agentapi.ErrNotFound):
		// The destination never prepared: no key was released to it.
	default:
		live, why := b.hostLive(ctx, m.Destination, b.now())
		if live {
			return fmt.Errorf("getting the destination's erasure evidence: %w", err)
		}
		req.UnverifiedErasure = true
		notes = append(notes, "destination lost before its erasure evidence ("+why+"); its keys are destroyed")
	}
	resp, err := b.kb.Destroy(ctx, req)
	if err != nil {
		return fmt.Errorf("destroying keys after abort: %w", err)
	}
	outcome, err := receiptOutcome(resp.Receipt)
	if err != nil {
		return err
	}
	if unresolved {
		// The source could not tell whether the destination resumed the guest: the receipt
		// tells it.
		r, err := b.agents.Abort(ctx, m.Source, &agentapi.AbortRequest{MigrationID: m.ID, Reason: m.AbortReason, Receipt: resp.Receipt})
		switch {
		case err != nil:
			notes = append(notes, fmt.Sprintf("source %s did not take the abort receipt: %v", m.Source, err))
		case r.Unresolved:
			notes = append(notes, "the source keeps the guest paused: the abort is "+outcome+", so whether the destination resumed the guest is not proven")
		}
	}
	if err := b.storeReceipt(ctx, m, outcome, resp); err != nil {
		return err
	}
	if err := b.releaseGuest(ctx, m); err != nil {
		return err
	}
	return b.transition(ctx, m.ID, PhaseAborting, PhaseAborted, func(m *Migration) {
		m.Outcome = outcome
		m.Notes = append(m.Notes, notes...)
		setDropped(m, dropped)
	})
}

// abortBecameCommit completes an abort that one end refused because the migration had
// committed (the source holds the destination's acknowledgement, or the destination resumed
// the guest): it moves the migration to Committed with that end's acknowledgement.
func (b *Broker) abortBecameCommit(ctx context.Context, m *Migration, end string, r *agentapi.AbortResponse) error {
	b.log.Warn("The migration had committed; completing the commit", logKeyMigration, m.ID, logKeyHost, end)
	return b.transition(ctx, m.ID, PhaseAborting, PhaseCommitted, func(m *Migration) {
		m.CommitAck = r.CommitAck
		if m.Progress == nil || m.Progress.Phase != agentapi.TransferCommitted {
			// The committed report was lost: the abort's answer says what it said.
			m.Progress = &agentapi.Progress{
				MigrationID: m.ID, Phase: agentapi.TransferCommitted, TotalBytes: m.MemoryBytes,
				CommitAck: r.CommitAck, MemoryDigest: r.MemoryDigest, Time: b.now(),
			}
		}
		m.Downtime, m.DowntimeSource, m.Rounds = m.Progress.Downtime, m.Progress.DowntimeSource, m.Progress.Rounds
		m.Notes = append(m.Notes, "abort ("+m.AbortReason+") refused by the "+end+": the migration had committed")
		m.AbortReason = ""
	})
}

// erasureEvidence gets host's evidence (role erased) of its erasure statement for migration
// m, bound to a fresh keybroker nonce and to the HPKE key the keybroker's grant names for that
// end. It returns the agent's errors (ErrNotFound for a migration it never heard of).
func (b *Broker) erasureEvidence(ctx context.Context, m *Migration, host string) (*attest.Evidence, []byte, error) {
	nonce, err := b.kb.Nonce(ctx, &kbwire.NonceRequest{MigrationID: m.ID, Role: attest.RoleErased})
	if err != nil {
		return nil, nil, fmt.Errorf("getting an erasure nonce: %w", err)
	}
	req := &agentapi.EraseRequest{MigrationID: m.ID, Nonce: nonce.Nonce}
	if g, err := grant.Parse(m.Grant); err == nil {
		end := g.Source
		if host == m.Destination {
			end = g.Destination
		}
		if end != nil {
			req.HPKEPublicKey = end.HPKEPublicKey
		}
	}
	ev, err := b.agents.Erase(ctx, host, req)
	if err != nil {
		return nil, nil, fmt.Errorf("erasing %s: %w", host, err)
	}
	return ev, nonce.Nonce, nil
}

// receiptOutcome reads the outcome a receipt states (the broker records it; the tenant
// verifies the signature).
func receiptOutcome(envelope json.RawMessage) (string, error) {
	env, err := receipt.Parse(envelope)
	if err != nil {
		return "", fmt.Errorf("reading the receipt: %w", err)
	}
	r, err := env.Decode()
	if err != nil {
		return "", fmt.Errorf("reading the receipt: %w", err)
	}
	return string(r.Outcome), nil
}

// storeReceipt stores the keybroker's receipt and its log proof, verbatim.
func (b *Broker) storeReceipt(ctx context.Context, m *Migration, outcome string, resp *DestroyResponse) error {
	r := Receipt{MigrationID: m.ID, Tenant: m.Tenant, VM: m.VM, Outcome: outcome, Envelope: resp.Receipt, Log: resp.Log, Stored: b.now(), Downtime: m.Downtime}
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encoding receipt: %w", err)
	}
	if _, err := b.store.receipts.Put(ctx, m.ID, data); err != nil {
		return fmt.Errorf("storing receipt: %w", err)
	}
	b.log.Info("Receipt stored", logKeyMigration, m.ID, logKeyOutcome, outcome)
	b.publishEvent(Event{MigrationID: m.ID, Kind: EventAudit, Phase: m.Phase, Message: "receipt stored: " + outcome})
	return nil
}

// moveGuest moves the guest record to the destination with epoch e+1, once.
func (b *Broker) moveGuest(ctx context.Context, m *Migration) error {
	return b.updateGuest(ctx, m.Tenant, m.VM, func(g *Guest) bool {
		if g.Epoch > m.Epoch {
			return false // already moved
		}
		g.Host, g.Epoch, g.WrappedMDK, g.Migration = m.Destination, m.Epoch+1, m.NextWrappedMDK, ""
		return true
	})
}

// releaseGuest frees the guest after an abort, once.
func (b *Broker) releaseGuest(ctx context.Context, m *Migration) error {
	return b.updateGuest(ctx, m.Tenant, m.VM, func(g *Guest) bool {
		if g.Migration != m.ID {
			return false
		}
		g.Migration = ""
		return true
	})
}

// updateGuest applies change to a guest record by CAS; change returns false to write nothing.
func (b *Broker) updateGuest(ctx context.Context, tenant, vm string, change func(*Guest) bool) error {
	key := GuestKey(tenant, vm)
	for {
		g, rev, err := getJSON[Guest](ctx, b.store.guests, key)
		if err != nil {
			return err
		}
		if !change(g) {
			return nil
		}
		g.Updated = b.now()
		if _, err := updateJSON(ctx, b.store.guests, key, g, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return err
		}
		return nil
	}
}

// progressRank orders transfer phases; a report never moves a record's progress backwards.
func progressRank(p agentapi.TransferPhase) int {
	switch p {
	case agentapi.TransferStarted:
		return 1
	case agentapi.TransferPrecopy:
		return 2
	case agentapi.TransferCutover:
		return 3
	case agentapi.TransferCommitted, agentapi.TransferFailed:
		return 4
	}
	return 0
}

// recordProgress records a progress report of host for migration id. It accepts reports only
// from the migration's source, during the transfer and cutover, never moving backwards.
func (b *Broker) recordProgress(ctx context.Context, id, host string, p *agentapi.Progress) (bool, error) {
	for {
		m, rev, err := getJSON[Migration](ctx, b.store.migrations, id)
		if err != nil {
			return false, err
		}
		if m.Source != host {
			b.log.Warn("Progress from a host that is not the source", logKeyMigration, id, logKeyHost, host)
			return false, nil
		}
		if m.Phase != PhaseTransferring && m.Phase != PhaseCuttingOver {
			return false, nil
		}
		if progressRank(p.Phase) == 0 {
			b.log.Warn("Progress with an unknown phase", logKeyMigration, id, logKeyPhase, string(p.Phase))
			return false, nil
		}
		if m.Progress != nil && progressRank(p.Phase) < progressRank(m.Progress.Phase) {
			return false, nil
		}
		now := b.now()
		m.Progress, m.LastProgress, m.Updated = p, now, now
		if _, err := updateJSON(ctx, b.store.migrations, id, m, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return false, err
		}
		return true, nil
	}
}
