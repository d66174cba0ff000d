package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Fleet operations: drain, evacuate, rebalance.
//
// A fleet operation is a list of guests to move (FleetItem), recorded in the lethe-fleet
// bucket before anything moves, and driven like a migration: by whichever broker holds its
// lease, so that a broker that dies mid-drain leaves the drain to the next one. Each guest
// moves in an ordinary migration, created as an operator's request would be: the tenant's
// policy decides at the keybroker, the migration ends with a receipt, and the operation
// records its id, outcome and reason. The operation only chooses when each migration starts:
//
//   - never more than Limits allow in flight across the cluster, out of one host and into one
//     host, counting every migration in flight, not only the operation's;
//   - never to a host that is not schedulable, lacks room, or (evacuate) is below the TCB;
//   - a guest that no host admits (its policy, capacity, state) is stuck: it stays where it
//     runs, and its reason lists every host's;
//   - after the deadline no migration starts, and an abort aborts the migrations in flight
//     that can still be aborted.
//
// Steps are idempotent. The operation's record is updated by compare-and-swap; it names each
// migration before creating it (with the id it will have), so that a broker that takes over
// finds every migration its predecessor started, even one that has ended since, and puts back
// to waiting a guest whose migration was never created. A migration also carries the
// operation's id in RequestedBy, for the record and for waking the operation when it ends.

// maxFleetItems bounds the guests of one operation (the record must fit in a NATS message).
const maxFleetItems = 2000

// maxListedOps bounds fleet.list's answer: the newest operations, without their guests.
const maxListedOps = 200

// defaultMaxMoves is a rebalance's move budget when the request names none.
const defaultMaxMoves = 10

// viaOp is the suffix of RequestedBy of a migration a fleet operation started.
func viaOp(id string) string { return " via " + id }

// opOf returns the fleet operation a migration's RequestedBy names, or "".
func opOf(requestedBy string) string {
	_, id, ok := strings.Cut(requestedBy, viaOp(""))
	if !ok || agentapi.ValidName(id) != nil {
		return ""
	}
	return id
}

// viaOpOrNone is viaOp(id), or "" without an operation.
func viaOpOrNone(id string) string {
	if id == "" {
		return ""
	}
	return viaOp(id)
}

// limits fills op limits' zero fields from the broker's settings.
func (b *Broker) limits(l Limits) (Limits, error) {
	if l.MaxParallel < 0 || l.PerSource < 0 || l.PerDestination < 0 {
		return l, fmt.Errorf("%w: negative limit", ErrInvalid)
	}
	l.MaxParallel = cmp.Or(l.MaxParallel, b.cfg.Fleet.MaxParallel)
	l.PerSource = cmp.Or(l.PerSource, b.cfg.Fleet.PerSource)
	l.PerDestination = cmp.Or(l.PerDestination, b.cfg.Fleet.PerDestination)
	return l, nil
}

// guestsOn returns the guests whose record places them on one of hosts, sorted by tenant and
// VM, with their sizes from the hosts' records where the guests' own do not say.
func (b *Broker) guestsOn(ctx context.Context, v *fleetView, hosts []string) ([]FleetItem, error) {
	all, err := listJSON[Guest](ctx, b.store.guests, ">")
	if err != nil {
		return nil, err
	}
	var items []FleetItem
	for _, g := range all {
		if !slices.Contains(hosts, g.Host) {
			continue
		}
		size := g.MemoryBytes
		if h := v.hosts[g.Host]; h != nil {
			if hg := h.Guest(g.Tenant, g.VM); hg != nil {
				size = hg.MemoryBytes
			}
		}
		items = append(items, FleetItem{Tenant: g.Tenant, VM: g.VM, From: g.Host, MemoryBytes: size, Status: ItemWaiting})
	}
	slices.SortFunc(items, func(a, c FleetItem) int { return cmp.Or(cmp.Compare(a.Tenant, c.Tenant), cmp.Compare(a.VM, c.VM)) })
	return items, nil
}

// planItems says, for a dry run, where each item would go if the operation started now and
// ran them one after the other, or why it would be stuck. Limits are not simulated.
func (b *Broker) planItems(ctx context.Context, v *fleetView, items []FleetItem, o placeOpts) error {
	for i := range items {
		it := &items[i]
		if it.To != "" {
			v.add(it.From, it.To, it.MemoryBytes)
			v.leaving[it.From] += it.MemoryBytes
			continue
		}
		ranked, verdicts, err := b.rank(ctx, v, it, o)
		if err != nil {
			return err
		}
		if len(ranked) == 0 {
			it.Status, it.Reason = ItemStuck, itemReason(stuckReason(verdicts), len(items))
			continue
		}
		it.To = ranked[0]
		v.add(it.From, it.To, it.MemoryBytes)
		v.leaving[it.From] += it.MemoryBytes
	}
	return nil
}

// rank judges every host for item under its tenant's policy and o.
func (b *Broker) rank(ctx context.Context, v *fleetView, it *FleetItem, o placeOpts) ([]string, []HostVerdict, error) {
	g, _, err := getJSON[Guest](ctx, b.store.guests, GuestKey(it.Tenant, it.VM))
	if err != nil {
		return nil, nil, err
	}
	pol, _, err := b.policyFor(ctx, it.Tenant, it.VM)
	if err != nil {
		return nil, []HostVerdict{{Host: "*", Reasons: []string{err.Error()}}}, nil
	}
	hosts := make([]*agentapi.HostRecord, 0, len(v.hosts))
	for _, h := range v.hosts {
		hosts = append(hosts, h)
	}
	verdicts, _ := b.verdicts(hosts, g.Host, g.Platform, pol.Envelope, b.now())
	var srcTCB *attest.HostTCB
	if h := v.hosts[g.Host]; h != nil {
		srcTCB = h.TCB
	}
	return b.place(v, verdicts, it.MemoryBytes, srcTCB, o), verdicts, nil
}

// stuckReason lists why each host was ruled out.
func stuckReason(verdicts []HostVerdict) string {
	var why []string
	for _, v := range verdicts {
		if !v.Pass {
			why = append(why, v.Host+": "+strings.Join(v.Reasons, "; "))
		}
	}
	return "no host admits the guest: " + strings.Join(why, " | ")
}

// startFleetOp records op, marks its hosts draining, and starts driving it. A host another
// running operation drains refuses the new one.
func (b *Broker) startFleetOp(ctx, run context.Context, op *FleetOp) error {
	if len(op.Items) > maxFleetItems {
		return fmt.Errorf("%w: %d guests, more than the %d one operation may move: drain fewer hosts at once", ErrInvalid, len(op.Items), maxFleetItems)
	}
	for _, h := range op.Hosts {
		st, _, err := getJSON[HostStateRecord](ctx, b.store.fleet, hostStatePrefix+h)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
		if st != nil && st.State == HostDraining && st.Operation != "" {
			if cur, _, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+st.Operation); err == nil && !cur.State.Terminal() {
				return fmt.Errorf("%w: host %s is already being drained by %s", ErrConflict, h, cur.ID)
			}
		}
	}
	if _, err := updateJSON(ctx, b.store.fleet, fleetOpPrefix+op.ID, op, 0); err != nil {
		return fmt.Errorf("recording fleet operation: %w", err)
	}
	for _, h := range op.Hosts {
		_, err := b.setHostState(ctx, h, func(*HostStateRecord) (*HostStateRecord, error) {
			return &HostStateRecord{Host: h, State: HostDraining, Reason: op.Reason, By: op.RequestedBy, Since: op.Created, Operation: op.ID}, nil
		})
		if err != nil {
			// The operation is recorded: its driver cordons what is missing (driveOp).
			b.log.Warn("Marking a host draining failed", logKeyHost, h, logKeyError, err)
		}
	}
	b.log.Info("Fleet operation started", "operation", op.ID, "kind", op.Kind, "hosts", op.Hosts, "guests", len(op.Items), "by", op.RequestedBy)
	b.publishOpEvent(op, fmt.Sprintf("%s started by %s: %d guests", op.Kind, op.RequestedBy, len(op.Items)))
	b.publishAudit(AuditRecord{Action: AuditFleetStart, By: op.RequestedBy, Target: op.ID, Reason: op.Reason, State: string(op.State),
		Detail: fmt.Sprintf("%s of %s: %d guests", op.Kind, strings.Join(op.Hosts, ", "), len(op.Items))})
	b.driveOp(run, op.ID)
	return nil
}

// newFleetOp returns an operation of kind over items, not yet recorded.
func (b *Broker) newFleetOp(c Caller, kind FleetOpKind, reason string, l Limits, timeout time.Duration, hosts []string, items []FleetItem) (*FleetOp, error) {
	if timeout < 0 {
		return nil, fmt.Errorf("%w: negative timeout", ErrInvalid)
	}
	if len(reason) > maxReason {
		return nil, fmt.Errorf("%w: reason longer than %d bytes", ErrInvalid, maxReason)
	}
	l, err := b.limits(l)
	if err != nil {
		return nil, err
	}
	now := b.now()
	op := &FleetOp{
		ID: newID("op-"), Kind: kind, State: FleetRunning, Reason: reason, RequestedBy: c.String(),
		Hosts: hosts, Limits: l, Items: items, Created: now, Updated: now,
	}
	if op.Items == nil {
		op.Items = []FleetItem{}
	}
	if timeout > 0 {
		op.Deadline = now.Add(timeout)
	}
	return op, nil
}

func (b *Broker) drainHost(ctx context.Context, c Caller, req *DrainRequest) (*FleetOpResponse, error) {
	return b.drainHosts(ctx, c, FleetDrain, []string{req.Host}, nil, req.Reason, req.Limits, req.Timeout, req.DryRun)
}

// drainHosts is drain and evacuate: every guest of hosts moves to hosts that qualify (at
// least minTCB, if set).
func (b *Broker) drainHosts(ctx context.Context, c Caller, kind FleetOpKind, hosts []string, minTCB *attest.HostTCB, reason string, l Limits, timeout time.Duration, dryRun bool) (*FleetOpResponse, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	for _, h := range hosts {
		if err := checkHostArgs(h, reason); err != nil {
			return nil, err
		}
	}
	v, _, err := b.newFleetView(ctx)
	if err != nil {
		return nil, err
	}
	items, err := b.guestsOn(ctx, v, hosts)
	if err != nil {
		return nil, err
	}
	op, err := b.newFleetOp(c, kind, reason, l, timeout, hosts, items)
	if err != nil {
		return nil, err
	}
	op.MinTCB = minTCB
	if len(hosts) == 0 {
		op.State = ""
		return &FleetOpResponse{Operation: b.view(op), Plan: &FleetPlan{Notes: []string{"no host to drain"}}}, nil
	}
	if dryRun {
		// The plan sees the hosts as the operation will: draining.
		for _, h := range hosts {
			v.states[h] = &HostStateRecord{Host: h, State: HostDraining, By: c.String()}
		}
		before := snapshotUse(v, hosts)
		if err := b.planItems(ctx, v, op.Items, placeOpts{minTCB: minTCB}); err != nil {
			return nil, err
		}
		op.State = ""
		return &FleetOpResponse{Operation: b.view(op), Plan: &FleetPlan{Hosts: planHosts(v, before)}}, nil
	}
	if err := b.startFleetOp(ctx, b.runCtx(), op); err != nil {
		return nil, err
	}
	return &FleetOpResponse{Operation: b.view(op)}, nil
}

func (b *Broker) evacuate(ctx context.Context, c Caller, req *EvacuateRequest) (*FleetOpResponse, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	tcb, err := attest.ParseHostTCB(req.BelowTCB)
	if err != nil {
		return nil, fmt.Errorf("%w: below TCB: %w", ErrInvalid, err)
	}
	hosts, err := b.store.listHosts(ctx)
	if err != nil {
		return nil, err
	}
	var below, unknown []string
	for _, h := range hosts {
		if h.TCB == nil {
			unknown = append(unknown, h.Host)
			continue
		}
		if at, comparable := h.TCB.AtLeast(tcb); comparable && !at {
			below = append(below, h.Host)
		}
	}
	slices.Sort(below)
	reason := cmp.Or(req.Reason, "TCB below "+tcb.String())
	resp, err := b.drainHosts(ctx, c, FleetEvacuate, below, &tcb, reason, req.Limits, req.Timeout, req.DryRun)
	if err != nil {
		return nil, err
	}
	if len(unknown) > 0 {
		if resp.Plan == nil {
			resp.Plan = &FleetPlan{}
		}
		slices.Sort(unknown)
		resp.Plan.Notes = append(resp.Plan.Notes, "TCB unknown, not evacuated: "+strings.Join(unknown, ", "))
	}
	if req.DryRun {
		resp.Plan.PolicyViolations, err = b.policyViolations(ctx, hosts)
		if err != nil {
			return nil, err
		}
	}
	return resp, nil
}

// policyViolations lists the guests whose host reports a TCB below the minimum their
// tenant's policy states for a destination (the pre-filter's MinimumTCB): the guests a new
// minimum would move, were they migrating now.
func (b *Broker) policyViolations(ctx context.Context, hosts []*agentapi.HostRecord) ([]PolicyViolation, error) {
	if b.cfg.ReadPolicy == nil {
		return nil, nil
	}
	byName := map[string]*agentapi.HostRecord{}
	for _, h := range hosts {
		byName[h.Host] = h
	}
	guests, err := listJSON[Guest](ctx, b.store.guests, ">")
	if err != nil {
		return nil, err
	}
	var out []PolicyViolation
	for _, g := range guests {
		h := byName[g.Host]
		if h == nil || h.TCB == nil {
			continue
		}
		pol, _, err := b.policyFor(ctx, g.Tenant, g.VM)
		if err != nil {
			continue
		}
		pf, err := b.cfg.ReadPolicy(pol.Envelope)
		if err != nil || pf.MinimumTCB == nil {
			continue
		}
		if at, comparable := h.TCB.AtLeast(*pf.MinimumTCB); comparable && !at {
			out = append(out, PolicyViolation{Tenant: g.Tenant, VM: g.VM, Host: g.Host,
				Reason: fmt.Sprintf("host TCB %s is below the policy's minimum %s", h.TCB, pf.MinimumTCB)})
		}
	}
	return out, nil
}

func (b *Broker) rebalance(ctx context.Context, c Caller, req *RebalanceRequest) (*FleetOpResponse, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	if req.Threshold < 0 || req.Threshold > 1 || req.MaxMoves < 0 {
		return nil, fmt.Errorf("%w: threshold must be from 0 to 1 and max moves not negative", ErrInvalid)
	}
	threshold := cmp.Or(req.Threshold, b.cfg.Fleet.RebalanceThreshold)
	maxMoves := cmp.Or(req.MaxMoves, defaultMaxMoves)
	v, hosts, err := b.newFleetView(ctx)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, h := range hosts {
		names = append(names, h.Host)
	}
	guests, err := b.guestsOn(ctx, v, names)
	if err != nil {
		return nil, err
	}
	before := snapshotUse(v, names)
	items, notes, err := b.planRebalance(ctx, v, guests, threshold, maxMoves)
	if err != nil {
		return nil, err
	}
	op, err := b.newFleetOp(c, FleetRebalance, fmt.Sprintf("committed memory above %.0f%%", threshold*100), req.Limits, req.Timeout, nil, items)
	if err != nil {
		return nil, err
	}
	plan := &FleetPlan{Hosts: planHosts(v, before), Notes: notes}
	if req.DryRun || len(items) == 0 {
		op.State = ""
		return &FleetOpResponse{Operation: b.view(op), Plan: plan}, nil
	}
	if err := b.startFleetOp(ctx, b.runCtx(), op); err != nil {
		return nil, err
	}
	return &FleetOpResponse{Operation: b.view(op), Plan: plan}, nil
}

// planRebalance moves guests off the host furthest over threshold, the largest guest that
// some host can take without going over threshold itself first, to the best such host in
// placement order, until no host is over threshold, no move helps, or maxMoves are planned.
// Guests in flight stay where they are.
func (b *Broker) planRebalance(ctx context.Context, v *fleetView, guests []FleetItem, threshold float64, maxMoves int) ([]FleetItem, []string, error) {
	var plan []FleetItem
	moved := map[string]bool{}
	stuck := map[string]bool{} // hosts over threshold that no move helps
	busy := map[string]bool{}
	for _, m := range b.activeMigrations() {
		busy[m.Source], busy[m.Destination] = true, true
	}
	for len(plan) < maxMoves {
		var over []string
		for name, h := range v.hosts {
			if h.AllocatableBytes > 0 && v.load(name) > threshold && !stuck[name] {
				over = append(over, name)
			}
		}
		if len(over) == 0 {
			break
		}
		slices.SortFunc(over, func(a, c string) int { return cmp.Or(cmp.Compare(v.load(c), v.load(a)), strings.Compare(a, c)) })
		src := over[0]
		var cands []FleetItem
		for _, g := range guests {
			if g.From == src && !moved[GuestKey(g.Tenant, g.VM)] {
				cands = append(cands, g)
			}
		}
		slices.SortStableFunc(cands, func(a, c FleetItem) int { return cmp.Compare(c.MemoryBytes, a.MemoryBytes) })
		done := false
		for _, g := range cands {
			// A host that the move would take over threshold is no better off than src.
			exclude := map[string]string{}
			for name, h := range v.hosts {
				if h.AllocatableBytes > 0 && float64(v.used(name)+g.MemoryBytes) > threshold*float64(h.AllocatableBytes) {
					exclude[name] = "would go over the threshold"
				}
			}
			ranked, _, err := b.rank(ctx, v, &g, placeOpts{exclude: exclude})
			if err != nil {
				return nil, nil, err
			}
			if len(ranked) == 0 {
				continue
			}
			g.To, g.Status = ranked[0], ItemWaiting
			plan = append(plan, g)
			moved[GuestKey(g.Tenant, g.VM)] = true
			v.add(src, g.To, g.MemoryBytes)
			v.incoming[g.To]--
			v.outgoing[src]--
			v.active--
			v.leaving[src] += g.MemoryBytes
			done = true
			break
		}
		if !done {
			stuck[src] = true
		}
	}
	var notes []string
	for name, h := range v.hosts {
		if h.AllocatableBytes > 0 && v.load(name) > threshold {
			why := "the move budget is spent"
			if stuck[name] {
				why = "no guest of it fits elsewhere under the threshold, where its policy allows"
			}
			notes = append(notes, fmt.Sprintf("%s stays at %.0f%%: %s", name, 100*v.load(name), why))
		}
		if busy[name] {
			notes = append(notes, name+" has migrations in flight; their guests are counted where they go")
		}
	}
	slices.Sort(notes)
	return plan, notes, nil
}

// snapshotUse returns the memory used on each of hosts.
func snapshotUse(v *fleetView, hosts []string) map[string]uint64 {
	out := map[string]uint64{}
	for _, h := range hosts {
		out[h] = v.used(h)
	}
	for h := range v.hosts {
		out[h] = v.used(h)
	}
	return out
}

// planHosts lists every host with its use before (from before) and after the plan (v).
func planHosts(v *fleetView, before map[string]uint64) []PlanHost {
	var out []PlanHost
	for name, h := range v.hosts {
		out = append(out, PlanHost{Host: name, TCB: h.TCB, AllocatableBytes: h.AllocatableBytes, CommittedBefore: before[name], CommittedAfter: v.used(name)})
	}
	slices.SortFunc(out, func(a, c PlanHost) int { return strings.Compare(a.Host, c.Host) })
	return out
}

// view returns op with its counts and time left.
func (b *Broker) view(op *FleetOp) *FleetOpView {
	v := &FleetOpView{FleetOp: *op, Counts: op.Counts()}
	c := v.Counts
	if op.State == FleetRunning && c.Moved+c.Failed > 0 && c.Waiting+c.Migrating > 0 {
		per := b.now().Sub(op.Created) / time.Duration(c.Moved+c.Failed)
		v.ETA = per * time.Duration(c.Waiting+c.Migrating)
	}
	return v
}

func (b *Broker) getFleetOp(ctx context.Context, c Caller, req *GetFleetOpRequest) (*FleetOpView, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	if err := agentapi.ValidName(req.ID); err != nil {
		return nil, fmt.Errorf("%w: operation id: %w", ErrInvalid, err)
	}
	op, _, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+req.ID)
	if err != nil {
		return nil, err
	}
	return b.view(op), nil
}

func (b *Broker) listFleetOps(ctx context.Context, c Caller, req *ListFleetOpsRequest) (*ListFleetOpsResponse, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	ops, err := listJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+">")
	if err != nil {
		return nil, err
	}
	resp := &ListFleetOpsResponse{Operations: []*FleetOpView{}}
	for _, op := range ops {
		if req.Active && op.State.Terminal() {
			continue
		}
		v := b.view(op)
		v.Items = nil // the counts say enough; fleet.get has them
		resp.Operations = append(resp.Operations, v)
	}
	slices.SortFunc(resp.Operations, func(a, c *FleetOpView) int { return c.Created.Compare(a.Created) })
	if len(resp.Operations) > maxListedOps {
		resp.Operations, resp.More = resp.Operations[:maxListedOps], true
	}
	return resp, nil
}

func (b *Broker) abortFleetOp(ctx context.Context, c Caller, req *AbortFleetOpRequest) (*FleetOpView, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	if err := agentapi.ValidName(req.ID); err != nil {
		return nil, fmt.Errorf("%w: operation id: %w", ErrInvalid, err)
	}
	if len(req.Reason) > maxReason {
		return nil, fmt.Errorf("%w: reason longer than %d bytes", ErrInvalid, maxReason)
	}
	op, err := b.updateOp(ctx, req.ID, false, func(op *FleetOp) bool {
		if op.State != FleetRunning {
			return false
		}
		op.State = FleetAborting
		op.AbortReason = "requested by " + c.String()
		if req.Reason != "" {
			op.AbortReason += ": " + req.Reason
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	if op.State == FleetAborting {
		b.publishOpEvent(op, "aborting: "+op.AbortReason)
		b.publishAudit(AuditRecord{Action: AuditFleetAbort, By: c.String(), Target: op.ID, Reason: req.Reason, State: string(op.State), Detail: string(op.Kind)})
		b.driveOp(b.runCtx(), op.ID)
	}
	return b.view(op), nil
}

// updateOp applies change to operation id by compare-and-swap, reading it again after a lost
// race; change returns false to leave it as it is. With own, the change applies only while
// this broker holds the lease, and renews it (even without a change, once half of it is
// gone). It returns the operation as it now is.
func (b *Broker) updateOp(ctx context.Context, id string, own bool, change func(*FleetOp) bool) (*FleetOp, error) {
	for {
		op, rev, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+id)
		if err != nil {
			return nil, err
		}
		now := b.now()
		renew := false
		if own {
			if op.Owner != b.cfg.ID {
				return nil, errNotMine
			}
			renew = op.LeaseUntil.Sub(now) < b.cfg.Lease/2
		}
		if !change(op) && !renew {
			return op, nil
		}
		if own {
			op.LeaseUntil = now.Add(b.cfg.Lease)
		}
		op.Updated = now
		if op.State.Terminal() {
			op.Owner, op.LeaseUntil = "", time.Time{}
			if op.Finished.IsZero() {
				op.Finished = now
			}
		}
		if _, err := updateJSON(ctx, b.store.fleet, fleetOpPrefix+id, op, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return nil, err
		}
		return op, nil
	}
}

// publishOpEvent publishes an audit event on the operation's events subject.
func (b *Broker) publishOpEvent(op *FleetOp, msg string) {
	b.publishEvent(Event{MigrationID: op.ID, Kind: EventAudit, Message: msg})
}
