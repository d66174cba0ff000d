package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// runCtx returns the broker's run context, under which drivers run beyond the request that
// started them.
func (b *Broker) runCtx() context.Context {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.run
}

// driveOp starts a driver for fleet operation id, or wakes the one already running.
func (b *Broker) driveOp(ctx context.Context, id string) {
	b.startOrWake(ctx, b.opsDriving, id, b.runOpDriver, nil, true)
}

// fleetLeaderKey is the key of the lethe-fleet bucket naming the broker that drives fleet
// operations: one broker starts every fleet migration, under the fleetMu of its process, so
// that two operations (or two brokers) never both take the last slot of a limit.
const fleetLeaderKey = "leader"

// fleetLeader is the record under fleetLeaderKey.
type fleetLeader struct {
	Owner      string    `json:"owner"`
	LeaseUntil time.Time `json:"leaseUntil"`
}

// leadFleet takes or renews the fleet leader's lease and reports whether this broker holds it.
func (b *Broker) leadFleet(ctx context.Context) bool {
	now := b.now()
	cur, rev, err := getJSON[fleetLeader](ctx, b.store.fleet, fleetLeaderKey)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return false
	}
	if cur != nil && cur.Owner != b.cfg.ID && cur.LeaseUntil.After(now) {
		b.setFleetLead(time.Time{})
		return false
	}
	if cur != nil && cur.Owner == b.cfg.ID && cur.LeaseUntil.Sub(now) > b.cfg.Lease/2 {
		b.setFleetLead(cur.LeaseUntil)
		return true
	}
	next := fleetLeader{Owner: b.cfg.ID, LeaseUntil: now.Add(b.cfg.Lease)}
	if _, err := updateJSON(ctx, b.store.fleet, fleetLeaderKey, next, rev); err != nil {
		return false
	}
	if cur == nil || cur.Owner != b.cfg.ID {
		b.log.Info("Driving fleet operations", "previous", func() string {
			if cur == nil {
				return ""
			}
			return cur.Owner
		}())
	}
	b.setFleetLead(next.LeaseUntil)
	return true
}

// setFleetLead records until when this broker leads the fleet (zero: it does not).
func (b *Broker) setFleetLead(until time.Time) {
	b.mu.Lock()
	b.fleetLeadUntil = until
	b.mu.Unlock()
}

// leadsFleet reports whether this broker's fleet leader lease is still running.
func (b *Broker) leadsFleet() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fleetLeadUntil.After(b.now())
}

// reconcileOps, on the fleet's leader, drives every unfinished fleet operation.
func (b *Broker) reconcileOps(ctx context.Context) {
	if !b.leadFleet(ctx) {
		return
	}
	ops, err := listJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+">")
	if err != nil {
		if ctx.Err() == nil {
			b.log.Warn("Listing fleet operations failed", logKeyError, err)
			b.cfg.Metrics.NATSError(natsOpKVList)
		}
		return
	}
	now := b.now()
	waiting, migrating := 0, 0
	for _, op := range ops {
		if op.State.Terminal() {
			continue
		}
		c := op.Counts()
		waiting += c.Waiting
		migrating += c.Migrating
		if op.Owner == b.cfg.ID || op.Owner == "" || !op.LeaseUntil.After(now) {
			b.driveOp(ctx, op.ID)
		}
	}
	b.cfg.Metrics.FleetQueue(waiting, migrating)
}

// runOpDriver advances operation id, a step per CheckInterval or wake-up, while this broker
// holds its lease and it is not finished.
func (b *Broker) runOpDriver(ctx context.Context, id string, wake <-chan struct{}) {
	log := b.log.With("operation", id)
	t := time.NewTicker(b.cfg.CheckInterval)
	defer t.Stop()
	for ctx.Err() == nil {
		if !b.leadsFleet() {
			return // reconcileOps starts it again here if this broker leads again
		}
		op, rev, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+id)
		if errors.Is(err, ErrNotFound) {
			return
		}
		if err == nil && op.State.Terminal() {
			return
		}
		if err == nil {
			now := b.now()
			if op.Owner != "" && op.Owner != b.cfg.ID && op.LeaseUntil.After(now) {
				return // another broker holds it
			}
			if op.Owner != b.cfg.ID {
				prev := op.Owner
				op.Owner, op.LeaseUntil = b.cfg.ID, now.Add(b.cfg.Lease)
				if _, err := updateJSON(ctx, b.store.fleet, fleetOpPrefix+id, op, rev); err != nil {
					if !errors.Is(err, errRevision) {
						log.Warn("Taking the fleet operation's lease failed", logKeyError, err)
					}
					continue
				}
				if prev != "" {
					log.Info("Fleet operation taken over", "from", prev)
				}
			}
			err = b.stepOp(ctx, id)
		}
		if errors.Is(err, errNotMine) {
			continue
		}
		if err != nil && ctx.Err() == nil {
			log.Warn("Fleet operation step failed; retrying", logKeyError, err)
		}
		select {
		case <-ctx.Done():
		case <-wake:
		case <-t.C:
		}
	}
}

// stepOp brings operation id up to date with its migrations, then starts what its limits
// allow, or finishes it.
func (b *Broker) stepOp(ctx context.Context, id string) error {
	op, _, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+id)
	if err != nil {
		return err
	}
	if err := b.settleItems(ctx, op); err != nil {
		return err
	}
	op, _, err = getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+id)
	if err != nil {
		return err
	}
	now := b.now()
	stopping := op.State == FleetAborting || (!op.Deadline.IsZero() && now.After(op.Deadline))
	if stopping {
		why := "operation aborted"
		if op.State != FleetAborting {
			why = "operation timed out"
		}
		if op.State == FleetAborting {
			b.abortItems(ctx, op)
		}
		if _, err := b.updateOp(ctx, id, true, func(op *FleetOp) bool {
			for i := range op.Items {
				if op.Items[i].Status == ItemWaiting {
					op.Items[i].Status, op.Items[i].Reason, op.Items[i].Ended = ItemSkipped, why, now
				}
			}
			return true
		}); err != nil {
			return err
		}
	} else if err := b.startItems(ctx, op); err != nil {
		return err
	}
	return b.finishOp(ctx, id)
}

// settleItems records the end of every migration of op that ended.
func (b *Broker) settleItems(ctx context.Context, op *FleetOp) error {
	type end struct {
		status  FleetItemStatus
		to      string
		outcome string
		reason  string
		at      time.Time
	}
	ends := map[int]end{}
	for i, it := range op.Items {
		if it.Status != ItemMigrating {
			continue
		}
		m, _, err := b.findMigration(ctx, it.Migration)
		if errors.Is(err, ErrNotFound) {
			// Named ahead and never created: its broker stopped in between.
			ends[i] = end{status: ItemWaiting}
			continue
		}
		if err != nil {
			return err
		}
		if !m.Phase.Terminal() {
			continue
		}
		e := end{to: m.Destination, outcome: m.Outcome, at: m.Finished}
		switch m.Outcome {
		case OutcomeErased, OutcomeCommittedUnverifiedErasure:
			e.status = ItemMoved
		default:
			e.status, e.reason = ItemFailed, itemReason(m.AbortReason, len(op.Items))
		}
		ends[i] = e
	}
	if len(ends) == 0 {
		return nil
	}
	_, err := b.updateOp(ctx, op.ID, true, func(cur *FleetOp) bool {
		for i, e := range ends {
			it := &cur.Items[i]
			if it.Status != ItemMigrating || it.Migration != op.Items[i].Migration {
				continue
			}
			if e.status == ItemWaiting {
				it.Status, it.Migration, it.Started = ItemWaiting, "", time.Time{}
				continue
			}
			it.Status, it.Outcome, it.Reason, it.Ended = e.status, e.outcome, e.reason, e.at
			if e.to != "" {
				it.To = e.to
			}
			b.cfg.Metrics.FleetGuest(string(cur.Kind), string(it.Status), it.Ended.Sub(it.Started))
			b.publishOpEvent(cur, fmt.Sprintf("%s/%s %s (%s → %s) %s", it.Tenant, it.VM, it.Status, it.From, it.To, strings.TrimSpace(it.Outcome+" "+it.Reason)))
		}
		return true
	})
	return err
}

// abortItems aborts op's migrations in flight that can still be aborted.
func (b *Broker) abortItems(ctx context.Context, op *FleetOp) {
	for _, it := range op.Items {
		if it.Status != ItemMigrating {
			continue
		}
		_, err := b.abortMigration(ctx, b.runCtx(), Caller{}, &AbortMigrationRequest{ID: it.Migration, Reason: "fleet operation " + op.ID + " aborted"})
		if err != nil && !errors.Is(err, ErrConflict) {
			b.log.Warn("Aborting a fleet operation's migration failed", "operation", op.ID, logKeyMigration, it.Migration, logKeyError, err)
		}
	}
}

// startItems starts the migrations of op's waiting guests that its limits allow now. One
// operation at a time: each reads the migrations the one before it started.
func (b *Broker) startItems(ctx context.Context, op *FleetOp) error {
	b.fleetMu.Lock()
	defer b.fleetMu.Unlock()
	v, _, err := b.newFleetView(ctx)
	if err != nil {
		return err
	}
	// The operation's record is the authority on its own migrations: one the snapshot lacks
	// (a listing of the bucket can miss a record written while it reads) still counts.
	for _, it := range op.Items {
		if it.Status == ItemMigrating && it.To != "" && !v.ids[it.Migration] {
			v.add(it.From, it.To, it.MemoryBytes)
		}
	}
	l := op.Limits
	migrating := op.Counts().Migrating
	for i, it := range op.Items {
		if it.Status != ItemWaiting {
			continue
		}
		if v.active >= l.MaxParallel {
			return nil
		}
		if v.outgoing[it.From] >= l.PerSource {
			continue
		}
		exclude := map[string]string{}
		for h, n := range v.incoming {
			if n >= l.PerDestination {
				exclude[h] = fmt.Sprintf("at its limit of %d incoming migrations", l.PerDestination)
			}
		}
		if it.To != "" && exclude[it.To] != "" {
			continue
		}
		st, mig, ahead, reason := b.startItem(ctx, op, i, &it, placeOpts{exclude: exclude, minTCB: op.MinTCB})
		if st == ItemStuck && (len(exclude) > 0 || migrating > 0) {
			// A host may be ruled out only for the moment (its incoming limit, memory that
			// a guest in flight will free): try again when something ends.
			st, reason = ItemWaiting, ""
		}
		if st == ItemWaiting && ahead == "" {
			continue
		}
		now := b.now()
		if _, err := b.updateOp(ctx, op.ID, true, func(cur *FleetOp) bool {
			c := &cur.Items[i]
			if c.Status != ItemWaiting && (c.Status != ItemMigrating || c.Migration != ahead) {
				return false
			}
			c.Status, c.Reason = st, itemReason(reason, len(cur.Items))
			switch {
			case mig != nil:
				c.Migration, c.To, c.Started = mig.ID, mig.Destination, now
			case st == ItemWaiting:
				c.Migration, c.Started = "", time.Time{}
			default:
				c.Migration, c.Ended = "", now
				b.cfg.Metrics.FleetGuest(string(cur.Kind), string(st), 0)
			}
			return true
		}); err != nil {
			return err
		}
		if st == ItemWaiting {
			continue
		}
		if mig != nil {
			migrating++
			v.add(mig.Source, mig.Destination, mig.MemoryBytes)
			b.publishOpEvent(op, fmt.Sprintf("%s/%s migrating %s → %s (%s)", it.Tenant, it.VM, mig.Source, mig.Destination, mig.ID))
		} else {
			b.publishOpEvent(op, fmt.Sprintf("%s/%s %s: %s", it.Tenant, it.VM, st, reason))
		}
	}
	return nil
}

// startItem starts the migration of waiting guest i of op. It returns the guest's new
// status: migrating with its migration; waiting with no reason, to try again later; or
// stuck, failed or skipped with why. ahead is the id the item was recorded with before the
// migration was created (empty if it got that far): the operation names its migration
// before the migration exists, so that a broker that takes the operation over after a crash
// finds it, even ended (the guest's record forgets a migration once it ends); settleItems
// puts an item back to waiting whose migration was never created.
func (b *Broker) startItem(ctx context.Context, op *FleetOp, i int, it *FleetItem, o placeOpts) (st FleetItemStatus, m *Migration, ahead, why string) {
	g, _, err := getJSON[Guest](ctx, b.store.guests, GuestKey(it.Tenant, it.VM))
	switch {
	case errors.Is(err, ErrNotFound):
		return ItemSkipped, nil, "", "the guest is no longer adopted"
	case err != nil:
		return ItemWaiting, nil, "", ""
	}
	if g.Migration != "" {
		m, _, err := getJSON[Migration](ctx, b.store.migrations, g.Migration)
		switch {
		case err != nil && !errors.Is(err, ErrNotFound):
			return ItemWaiting, nil, "", ""
		case err == nil && !m.Phase.Terminal():
			return ItemWaiting, nil, "", "" // someone else moves it: see where it ends
		}
	}
	if g.Host != it.From {
		return ItemSkipped, nil, "", "the guest moved to " + g.Host + " meanwhile"
	}
	id := newID("mig-")
	resp, err := b.createMigration(ctx, b.runCtx(), Caller{}, &CreateMigrationRequest{
		Tenant: it.Tenant, VM: it.VM, Destination: it.To, place: o, operation: op.ID, id: id,
		// Once placement found a host, and before anything is written of the migration.
		ahead: func() error {
			applied := false
			_, err := b.updateOp(ctx, op.ID, true, func(cur *FleetOp) bool {
				c := &cur.Items[i]
				if applied = c.Status == ItemWaiting; applied {
					c.Status, c.Migration, c.Started = ItemMigrating, id, b.now()
				}
				return applied
			})
			switch {
			case err != nil:
				return err
			case !applied:
				return errors.New("the operation's guest is no longer waiting")
			}
			ahead = id
			return nil
		},
	})
	switch {
	case err == nil:
		return ItemMigrating, resp.Migration, ahead, ""
	case errors.Is(err, errNoHost):
		return ItemStuck, nil, ahead, err.Error()
	case errors.Is(err, ErrConflict), errors.Is(err, ErrUnavailable):
		return ItemWaiting, nil, ahead, ""
	case errors.Is(err, ErrFailedPrecondition), errors.Is(err, ErrInvalid), errors.Is(err, ErrNotFound):
		return ItemFailed, nil, ahead, err.Error()
	}
	b.log.Warn("Starting a fleet operation's migration failed; retrying", "operation", op.ID, logKeyTenant, it.Tenant, logKeyVM, it.VM, logKeyError, err)
	return ItemWaiting, nil, ahead, ""
}

// itemReasonsBytes bounds the reasons a fleet operation records for its guests, all
// together: a stuck guest's lists every host's, and the operation's record is one NATS
// message. Each guest's share is at least minItemReason bytes; a dry run of the guest's
// migration gives the whole.
const (
	itemReasonsBytes = 256 << 10
	minItemReason    = 128
)

// itemReason returns why, cut to its share of an operation of n guests.
func itemReason(why string, n int) string {
	limit := max(minItemReason, itemReasonsBytes/max(n, 1))
	if len(why) <= limit {
		return why
	}
	const more = "…"
	cut := limit - len(more)
	for cut > 0 && !utf8.RuneStart(why[cut]) {
		cut--
	}
	return why[:cut] + more
}

// finishOp ends operation id when none of its guests is waiting or migrating. It first says
// what became of its hosts — maintenance when a drain moved all their guests and none is
// migrating into them, cordoned otherwise — so that an operation seen ended has its hosts'
// states set.
func (b *Broker) finishOp(ctx context.Context, id string) error {
	op, err := b.updateOp(ctx, id, true, func(*FleetOp) bool { return false })
	if err != nil {
		return err
	}
	if c := op.Counts(); c.Waiting+c.Migrating > 0 {
		return nil
	}
	final := FleetDone
	if op.State == FleetAborting {
		final = FleetAborted
	}
	left := map[string]int{}
	guests, err := listJSON[Guest](ctx, b.store.guests, ">")
	if err != nil {
		return err
	}
	for _, g := range guests {
		left[g.Host]++
		if g.Migration == "" {
			continue
		}
		// A guest on its way into a drained host will be on it: the host is not empty.
		m, _, err := getJSON[Migration](ctx, b.store.migrations, g.Migration)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
		if err == nil && !m.Phase.Terminal() && m.Destination != g.Host && slices.Contains(op.Hosts, m.Destination) {
			left[m.Destination]++
		}
	}
	for _, h := range op.Hosts {
		_, err := b.setHostState(ctx, h, func(cur *HostStateRecord) (*HostStateRecord, error) {
			if cur == nil || cur.Operation != op.ID {
				return nil, nil // someone changed it since, or a previous try set it
			}
			next := *cur
			next.Since, next.Operation = b.now(), ""
			if final == FleetDone && left[h] == 0 {
				next.State, next.Reason = HostMaintenance, fmt.Sprintf("%s %s: every guest moved off", op.Kind, op.ID)
			} else {
				next.State, next.Reason = HostCordoned, fmt.Sprintf("%s %s %s; %d guests remain", op.Kind, op.ID, final, left[h])
			}
			return &next, nil
		})
		if err != nil {
			return fmt.Errorf("setting the state of drained host %s: %w", h, err)
		}
	}
	op, err = b.updateOp(ctx, id, true, func(op *FleetOp) bool {
		if op.State.Terminal() {
			return false
		}
		op.State = final
		return true
	})
	if err != nil {
		return err
	}
	c := op.Counts()
	b.log.Info("Fleet operation finished", "operation", op.ID, "state", op.State, "moved", c.Moved, "failed", c.Failed, "stuck", c.Stuck, "skipped", c.Skipped)
	b.publishOpEvent(op, fmt.Sprintf("%s %s: %d moved, %d failed, %d stuck, %d skipped", op.Kind, op.State, c.Moved, c.Failed, c.Stuck, c.Skipped))
	b.publishAudit(AuditRecord{Action: AuditFleetFinish, By: op.RequestedBy, Target: op.ID, State: string(op.State),
		Detail: fmt.Sprintf("%s: %d moved, %d failed, %d stuck, %d skipped", op.Kind, c.Moved, c.Failed, c.Stuck, c.Skipped)})
	return nil
}
