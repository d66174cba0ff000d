package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Placement: where a guest goes when no destination is named.
//
// A host qualifies when the tenant's pre-filter passes it (verdicts), the operator has not
// cordoned it (HostStateRecord), it has room for the guest's memory beside the guests it runs
// and those arriving (agentapi.HostRecord.AllocatableBytes; a host that reports none is not
// limited), and the caller does not exclude it (a fleet operation excludes hosts at their
// limit of incoming migrations, or below an evacuation's TCB). The qualifying hosts with a
// place for another migration come first (see admission.go; counted from the broker's
// snapshot of the migrations in flight): a host at its limit qualifies still, and a
// migration placed there waits for admission. Then they are ranked by the keys of
// FleetConfig.PlacementOrder, in order:
//
//	tcb     hosts whose reported TCB is at least the source's first, then those that cannot be
//	        compared (unknown, another platform), then those below: a destination below the
//	        source is what the keybroker's destinationTcbAtLeastSource refuses
//	memory  least committed first: (committed + arriving) / allocatable
//	guests  fewest guests first
//
// and then by name. The broker's ranking is advice, as the pre-filter is: the keybroker decides on verified evidence, and a host it refuses costs an attempt (Config.MaxAttempts),
// after which the next candidate is tried.

// The keys of FleetConfig.PlacementOrder.
const (
	PlaceByTCB    = "tcb"
	PlaceByMemory = "memory"
	PlaceByGuests = "guests"
)

// PlacementKeys are the keys FleetConfig.PlacementOrder may hold.
var PlacementKeys = []string{PlaceByTCB, PlaceByMemory, PlaceByGuests}

// CheckPlacementOrder returns an error naming the first key of order that is not one of
// PlacementKeys, or a key given twice.
func CheckPlacementOrder(order []string) error {
	for i, k := range order {
		if !slices.Contains(PlacementKeys, k) {
			return fmt.Errorf("placement order: %q is not one of %s", k, strings.Join(PlacementKeys, ", "))
		}
		if slices.Contains(order[:i], k) {
			return fmt.Errorf("placement order: %q given twice", k)
		}
	}
	return nil
}

// fleetView is what placement and fleet operations read of the fleet at one moment.
type fleetView struct {
	hosts  map[string]*agentapi.HostRecord
	states map[string]*HostStateRecord
	// arriving is the memory of the guests migrating to each host; incoming and outgoing
	// count the migrations in flight to and from each host; active counts them all.
	arriving           map[string]uint64
	incoming, outgoing map[string]int
	active             int
	// ids are the migrations in flight counted.
	ids map[string]bool
	// leaving is the memory planned to leave each host (a rebalance's plan); it counts as
	// free only in plans.
	leaving map[string]uint64
}

// newFleetView reads the hosts and their states, and takes the migrations in flight from the
// broker's snapshot (see noteActive).
func (b *Broker) newFleetView(ctx context.Context) (*fleetView, []*agentapi.HostRecord, error) {
	hosts, err := b.store.listHosts(ctx)
	if err != nil {
		return nil, nil, err
	}
	states, err := listJSON[HostStateRecord](ctx, b.store.fleet, hostStatePrefix+">")
	if err != nil {
		return nil, nil, err
	}
	v := &fleetView{
		hosts: map[string]*agentapi.HostRecord{}, states: map[string]*HostStateRecord{},
		arriving: map[string]uint64{}, incoming: map[string]int{}, outgoing: map[string]int{},
		leaving: map[string]uint64{}, ids: map[string]bool{},
	}
	for _, h := range hosts {
		v.hosts[h.Host] = h
	}
	for _, s := range states {
		v.states[s.Host] = s
	}
	for id, m := range b.activeMigrations() {
		v.add(m.Source, m.Destination, m.MemoryBytes)
		v.ids[id] = true
	}
	return v, hosts, nil
}

// add counts a migration in flight from src to dst of size bytes.
func (v *fleetView) add(src, dst string, size uint64) {
	v.arriving[dst] += size
	v.incoming[dst]++
	v.outgoing[src]++
	v.active++
}

// state returns host's state: schedulable when nothing was said of it.
func (v *fleetView) state(host string) HostState {
	if s := v.states[host]; s != nil {
		return s.State
	}
	return HostSchedulable
}

// used returns the memory committed on host or arriving, less what a plan moves off it.
func (v *fleetView) used(host string) uint64 {
	h := v.hosts[host]
	if h == nil {
		return 0
	}
	n := h.CommittedBytes() + v.arriving[host]
	return n - min(n, v.leaving[host])
}

// free returns the memory host can still take, and whether it states a limit at all.
func (v *fleetView) free(host string) (uint64, bool) {
	h := v.hosts[host]
	if h == nil || h.AllocatableBytes == 0 {
		return 0, false
	}
	return h.AllocatableBytes - min(h.AllocatableBytes, v.used(host)), true
}

// load returns the fraction of host's allocatable memory that is used; 1 for a host that
// states no limit.
func (v *fleetView) load(host string) float64 {
	h := v.hosts[host]
	if h == nil || h.AllocatableBytes == 0 {
		return 1
	}
	return float64(v.used(host)) / float64(h.AllocatableBytes)
}

// placeOpts narrow placement for a fleet operation.
type placeOpts struct {
	// exclude maps hosts not to use to why.
	exclude map[string]string
	// minTCB, if set, is the TCB every destination must be known to reach.
	minTCB *attest.HostTCB
	// tenant words the reasons for a tenant, who may learn whether a host takes its guest
	// but not the operator's reasons nor how much memory other tenants' guests hold.
	tenant bool
}

// place judges the hosts of verdicts (the pre-filter's) as destinations of a guest of size
// bytes whose source reports srcTCB, and returns those that qualify, best first. It marks
// the verdicts of hosts it rules out as failing, with the reason.
func (b *Broker) place(v *fleetView, verdicts []HostVerdict, size uint64, srcTCB *attest.HostTCB, o placeOpts) []string {
	var ok []string
	for i := range verdicts {
		vd := &verdicts[i]
		var why []string
		switch st := v.states[vd.Host]; {
		case st == nil || st.State == HostSchedulable:
		default:
			if o.tenant {
				why = append(why, fmt.Sprintf("%s: takes no new guests", st.State))
			} else {
				why = append(why, fmt.Sprintf("%s by %s: %s", st.State, st.By, cmp.Or(st.Reason, "no reason given")))
			}
		}
		if free, limited := v.free(vd.Host); limited && free < size {
			if o.tenant {
				why = append(why, fmt.Sprintf("no room for the guest's %d MiB", size>>20))
			} else {
				why = append(why, fmt.Sprintf("no room: %d MiB free of %d MiB allocatable, the guest needs %d MiB",
					free>>20, v.hosts[vd.Host].AllocatableBytes>>20, size>>20))
			}
		}
		if r, ex := o.exclude[vd.Host]; ex {
			why = append(why, r)
		}
		if o.minTCB != nil {
			h := v.hosts[vd.Host]
			if h == nil || h.TCB == nil {
				why = append(why, "TCB unknown, the operation needs at least "+o.minTCB.String())
			} else if at, comparable := h.TCB.AtLeast(*o.minTCB); !comparable || !at {
				why = append(why, fmt.Sprintf("TCB %s is below %s", h.TCB, o.minTCB))
			}
		}
		if len(why) > 0 {
			vd.Pass = false
			vd.Reasons = append(vd.Reasons, why...)
		}
		if vd.Pass {
			ok = append(ok, vd.Host)
		}
	}
	tcbRank := func(host string) int {
		h := v.hosts[host]
		if srcTCB == nil || h == nil || h.TCB == nil {
			return 1
		}
		at, comparable := h.TCB.AtLeast(*srcTCB)
		switch {
		case !comparable:
			return 1
		case at:
			return 0
		}
		return 2
	}
	guests := func(host string) int {
		if h := v.hosts[host]; h != nil {
			return len(h.Guests)
		}
		return 0
	}
	// Hosts with a place for another migration come first (see admission.go): a host at its
	// limit qualifies still, but the migration would wait there for one.
	full := func(host string) bool {
		limit := b.cfg.MaxMigrationsPerHost
		if h := v.hosts[host]; h != nil && h.MaxMigrations > 0 {
			limit = min(limit, h.MaxMigrations)
		}
		return v.incoming[host]+v.outgoing[host] >= limit
	}
	slices.SortFunc(ok, func(a, c string) int {
		if r := cmpBool(full(a), full(c)); r != 0 {
			return r
		}
		for _, k := range b.cfg.Fleet.PlacementOrder {
			var r int
			switch k {
			case PlaceByTCB:
				r = cmp.Compare(tcbRank(a), tcbRank(c))
			case PlaceByMemory:
				r = cmp.Compare(v.load(a), v.load(c))
			case PlaceByGuests:
				r = cmp.Compare(guests(a), guests(c))
			}
			if r != 0 {
				return r
			}
		}
		return strings.Compare(a, c)
	})
	return ok
}

// cmpBool orders false before true.
func cmpBool(a, c bool) int {
	switch {
	case a == c:
		return 0
	case a:
		return 1
	}
	return -1
}

// errNoHost is placement finding no qualifying host; its text is the pre-filter's and
// placement's reasons, host by host.
var errNoHost = errors.New("no host qualifies")

// choose returns the requested destination if it qualifies, or else the qualifying hosts in
// placement order. The error of a refusal matches ErrFailedPrecondition and says why.
func choose(requested string, verdicts []HostVerdict, ranked []string) ([]string, error) {
	if requested != "" {
		if err := agentapi.ValidName(requested); err != nil {
			return nil, fmt.Errorf("%w: destination: %w", ErrInvalid, err)
		}
		for _, v := range verdicts {
			if v.Host != requested {
				continue
			}
			if !v.Pass {
				return nil, fmt.Errorf("%w: destination %s does not qualify: %s", ErrFailedPrecondition, requested, strings.Join(v.Reasons, "; "))
			}
			return []string{requested}, nil
		}
		return nil, fmt.Errorf("%w: destination %s is not registered", ErrFailedPrecondition, requested)
	}
	if len(ranked) == 0 {
		var why []string
		for _, v := range verdicts {
			why = append(why, v.Host+": "+strings.Join(v.Reasons, "; "))
		}
		if len(why) == 0 {
			why = append(why, "no host is registered")
		}
		return nil, fmt.Errorf("%w: %w (%s)", ErrFailedPrecondition, errNoHost, strings.Join(why, " | "))
	}
	return ranked, nil
}
