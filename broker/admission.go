package broker

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Admission: how many migrations a host takes part in at once.
//
// A migration leaves Requested only when its source and its destination each have a place
// for it: a host has hostLimit places (Config.MaxMigrationsPerHost, lowered to what the
// host's agent states it takes, agentapi.HostRecord.MaxMigrations), and each admitted
// migration holds one on both of its hosts until it ends; one tenant's migrations hold at most
// Config.TenantShare of a host's places, so that a tenant naming a host for many of its guests
// leaves places there for the others. Until then it waits in Requested,
// its record saying why (Migration.Waiting), for at most Timeouts.Queue; its start timeout
// counts from its admission (Migration.Admitted). An agent refuses a migration beyond its own
// limit, and that refusal aborts the migration: admission is what keeps brokers below it.
//
// The places of a host are one record in the fleet bucket (slotPrefix + host) listing the
// migrations that hold them, written by compare-and-swap: brokers that admit at the same
// moment serialize on it, so that two brokers admit no more than the limit between them. A
// migration is admitted by taking a place on its source and then on its destination; if the
// destination has none the source's is given back. Its places are given back when it ends
// (transition). What can make a host hold more than its limit, and by how much:
//   - a fallback to another destination after a denial takes a place there whatever the
//     count (the migration was admitted already, and gives its place on the denied host
//     back): at most Config.MaxAttempts-1 places per migration, and only after denials;
//   - a lowered limit (a restarted agent stating fewer) leaves the migrations admitted under
//     the old one until they end.
// A place whose migration ended without giving it back (its broker stopped between the two
// writes) is reclaimed when the host is full: one held for longer than staleSlot by a
// migration that no listing of the migrations bucket has as unfinished is dropped.
//
// Waiting costs nothing while no place frees. Every broker watches the places records
// (watchPlaces) and keeps the latest of each host's (Broker.places); when that view shows a
// place on both hosts of a migration it drives that waits, it wakes it, oldest first, as many
// as there are places, whichever broker gave them back. A waiting migration looks at the view,
// not the bucket, before it writes, and sleeps for waitingRecheck CheckIntervals between
// unwoken looks, under a lease waitingLease times as long as a driven one's (a waiting
// migration is taken over that much later when its broker dies: it only waits). The view is
// behind the bucket by a watch's delivery, and the bucket decides: a migration a stale view
// wakes fails its compare-and-swap and waits again. While the watch is down, waiting
// migrations look at the bucket every waitingCheck CheckIntervals, and a place given back
// wakes the migration that waited longest for its host.

// slotPrefix keys a host's places in the fleet bucket: slot.<host> holds a hostSlots.
const slotPrefix = "slot."

// defaultMaxMigrationsPerHost is Config.MaxMigrationsPerHost's default.
const defaultMaxMigrationsPerHost = 64

// waitingNews is how often, at most, a waiting migration's record is rewritten to say what it
// waits for now.
const waitingNews = 30 * time.Second

// errWaiting is a migration waiting in Requested for a place: its driver looks again when a
// place is given back, or after waitingRecheck.
var errWaiting = errors.New("waiting for admission")

// waitingRecheck is how many CheckIntervals a waiting migration sleeps between unwoken looks
// while the places are watched; waitingLease is how many Leases its lease lasts.
const (
	waitingRecheck = 20
	waitingLease   = 4
)

// hostSlots is the record of a host's places.
type hostSlots struct {
	Host string `json:"host"`
	// Migrations are the migrations holding a place on the host, each with when it took it.
	Migrations map[string]time.Time `json:"migrations"`
	// Tenants are the tenants of the migrations holding a place, by migration id.
	Tenants map[string]string `json:"tenants,omitempty"`
}

// tenantShare is how many of a host's limit places one tenant's migrations may hold:
// Config.TenantShare of them, rounded up.
func (b *Broker) tenantShare(limit int) int {
	return int(math.Ceil(float64(limit) * b.cfg.TenantShare))
}

// hostLimit returns how many migrations host takes part in at once: the broker's limit,
// lowered to what its agent states. A host whose record cannot be read has the broker's.
func (b *Broker) hostLimit(ctx context.Context, host string) int {
	limit := b.cfg.MaxMigrationsPerHost
	if rec, err := b.hostRecord(ctx, host); err == nil && rec.MaxMigrations > 0 {
		limit = min(limit, rec.MaxMigrations)
	}
	return limit
}

// stepAdmit moves m out of Requested when its source and destination each have a place for
// it, or records why it waits and returns errWaiting.
func (b *Broker) stepAdmit(ctx context.Context, m *Migration) error {
	hosts := []string{m.Source, m.Destination}
	limits := []int{b.hostLimit(ctx, m.Source), b.hostLimit(ctx, m.Destination)}
	// A look before any write, at the view while the places are watched: a host that is full
	// costs no write, and no read.
	for i, h := range hosts {
		s, seen, err := b.placesOf(ctx, h)
		if err != nil {
			return err
		}
		held, mine, ok := b.room(s, m.ID, m.Tenant, limits[i])
		if ok || held >= limits[i] && b.reclaim(ctx, h, held) < limits[i] {
			continue
		}
		return b.wait(ctx, m, limits, waitReason(m.Tenant, h, held, mine, limits[i]), seen)
	}
	for i, h := range hosts {
		n, mine, took, err := b.takeSlot(ctx, h, m.ID, m.Tenant, limits[i])
		if err == nil && !took {
			err = b.wait(ctx, m, limits, waitReason(m.Tenant, h, n, mine, limits[i]), false)
		}
		if err != nil {
			for _, g := range hosts[:i] {
				b.giveSlot(ctx, g, m.ID)
			}
			return err
		}
	}
	b.unwait(m.ID)
	err := b.transition(ctx, m.ID, PhaseRequested, PhaseAttesting, func(m *Migration) {
		m.Admitted, m.Waiting = b.now(), ""
	})
	if errors.Is(err, errNotMine) {
		// Ended or taken over meanwhile: the places go back; a broker driving it on takes them
		// again, as a migration holding one already keeps it.
		if cur, _, gerr := getJSON[Migration](ctx, b.store.migrations, m.ID); gerr != nil || cur.Phase.Terminal() {
			b.giveSlots(ctx, m.ID, hosts...)
		}
	}
	return err
}

// waitReason says why a migration of tenant waits for a place on host, which has held of
// them, mine of them tenant's, under limit.
func waitReason(tenant, host string, held, mine, limit int) string {
	if held < limit {
		return fmt.Sprintf("waiting: tenant %s has %d migrations in flight on host %s, the most one tenant has there", tenant, mine, host)
	}
	return fmt.Sprintf("waiting: host %s has %d migrations in flight, the most it takes", host, held)
}

// wait notes m as waiting for a place on its hosts, under limits, records reason on it if it
// is news, and returns errWaiting. seen says the look that found no place was at the view:
// if the view shows a place now, one was given back since, and m's driver is woken (a look
// at the bucket that found none does not wake it: the view may be behind the bucket).
func (b *Broker) wait(ctx context.Context, m *Migration, limits []int, reason string, seen bool) error {
	b.waitingMu.Lock()
	if b.waiting == nil {
		b.waiting = map[string]waiter{}
	}
	w := waiter{tenant: m.Tenant, since: m.Created, hosts: [2]string{m.Source, m.Destination}, limits: [2]int{limits[0], limits[1]}}
	b.waiting[m.ID] = w
	wake := seen && b.placesSeen && len(b.admissible(map[string]waiter{m.ID: w})) > 0
	b.waitingMu.Unlock()
	if wake {
		b.drive(b.runCtx(), m.ID)
	}
	// A migration waiting on two busy hosts would name one, then the other: the record
	// says what it waits for, rewritten at most every waitingNews.
	if m.Waiting == reason || m.Waiting != "" && b.now().Sub(m.Updated) < waitingNews {
		return errWaiting
	}
	// The lease of a waiting migration is longer (waitingFor): taking it here saves the
	// driver a write, and a look, when it next wakes.
	_, lease := b.waitingFor()
	if err := b.update(ctx, m.ID, PhaseRequested, func(m *Migration) {
		m.Waiting, m.LeaseUntil = reason, b.now().Add(lease)
	}); err != nil {
		return err
	}
	b.log.Info("Migration waits for admission", logKeyMigration, m.ID, logKeyReason, reason)
	b.publishEvent(Event{MigrationID: m.ID, Kind: EventAudit, Phase: PhaseRequested, Message: reason})
	return errWaiting
}

// waiter is a migration this broker drives that waits for admission.
type waiter struct {
	tenant string
	since  time.Time
	// hosts are its source and destination, limits their limits at its last look.
	hosts  [2]string
	limits [2]int
	// asleep says its driver sleeps until woken or waitingFor's time.
	asleep bool
}

// setAsleep notes whether the driver of waiting migration id sleeps.
func (b *Broker) setAsleep(id string, asleep bool) {
	b.waitingMu.Lock()
	if w, ok := b.waiting[id]; ok {
		w.asleep = asleep
		b.waiting[id] = w
	}
	b.waitingMu.Unlock()
}

// unwait forgets that migration id waits.
func (b *Broker) unwait(id string) {
	b.waitingMu.Lock()
	delete(b.waiting, id)
	b.waitingMu.Unlock()
}

// waitingFor returns how long the driver of a waiting migration sleeps unwoken, and how long
// the lease of one lasts.
func (b *Broker) waitingFor() (sleep, lease time.Duration) {
	lease = waitingLease * b.cfg.Lease
	b.waitingMu.Lock()
	seen := b.placesSeen
	b.waitingMu.Unlock()
	if !seen {
		return min(waitingCheck*b.cfg.CheckInterval, b.cfg.Lease/3), lease
	}
	return min(waitingRecheck*b.cfg.CheckInterval, lease/3), lease
}

// wakeWaiting, when the places are not watched, wakes the driver of the migration that has
// waited longest for a place on host, now that one was given back there. (While they are
// watched, the watch wakes the migrations the place lets in: wakeAdmissible.)
func (b *Broker) wakeWaiting(host string) {
	b.waitingMu.Lock()
	first, since := "", time.Time{}
	for id, w := range b.waiting {
		if (w.hosts[0] == host || w.hosts[1] == host) && (first == "" || w.since.Before(since)) {
			first, since = id, w.since
		}
	}
	seen := b.placesSeen
	b.waitingMu.Unlock()
	if first != "" && !seen {
		b.drive(b.runCtx(), first)
	}
}

// wakeAdmissible wakes the drivers of the waiting migrations the view has places for.
func (b *Broker) wakeAdmissible() {
	b.waitingMu.Lock()
	ids := b.admissible(b.waiting)
	b.waitingMu.Unlock()
	for _, id := range ids {
		b.drive(b.runCtx(), id)
	}
}

// admissible returns the migrations of waiting that the view has places for, oldest first,
// each counted as holding its places for the next: the ones a wake-up would let in. Called
// with waitingMu held.
func (b *Broker) admissible(waiting map[string]waiter) []string {
	held := map[string]int{}
	mine := map[[2]string]int{} // host, tenant
	counted := map[string]bool{}
	count := func(h string) {
		if counted[h] {
			return
		}
		counted[h] = true
		if s := b.places[h]; s != nil {
			held[h] = len(s.Migrations)
			for id := range s.Migrations {
				mine[[2]string{h, s.Tenants[id]}]++
			}
		}
	}
	ids := slices.SortedFunc(maps.Keys(waiting), func(x, y string) int {
		return cmp.Or(waiting[x].since.Compare(waiting[y].since), cmp.Compare(x, y))
	})
	var out []string
	for _, id := range ids {
		w := waiting[id]
		fits := true
		for i, h := range w.hosts {
			count(h)
			if s := b.places[h]; s != nil {
				if _, holds := s.Migrations[id]; holds {
					continue
				}
			}
			fits = fits && held[h] < w.limits[i] && mine[[2]string{h, w.tenant}] < b.tenantShare(w.limits[i])
		}
		if !fits {
			continue
		}
		for _, h := range w.hosts {
			held[h]++
			mine[[2]string{h, w.tenant}]++
		}
		out = append(out, id)
	}
	return out
}

// watchPlaces keeps the view of every host's places (Broker.places) until ctx ends, and wakes
// the waiting migrations each change lets in.
func (b *Broker) watchPlaces(ctx context.Context) {
	b.keepWatching(ctx, "the places of hosts", nil, func(ctx context.Context) (jetstream.KeyWatcher, error) {
		return watchBounded(ctx, b.store.fleet, slotPrefix+">")
	}, b.followPlaces)
}

// followPlaces applies what w delivers to the view, which counts as seen from the end of w's
// first delivery of every record until w ends.
func (b *Broker) followPlaces(ctx context.Context, w jetstream.KeyWatcher) {
	defer func() {
		b.waitingMu.Lock()
		b.placesSeen = false
		b.waitingMu.Unlock()
	}()
	places := map[string]*hostSlots{}
	eachUpdate(ctx, w, func(e jetstream.KeyValueEntry) {
		b.waitingMu.Lock()
		if e == nil { // every record delivered: the view is whole
			b.places, b.placesSeen = places, true
		} else {
			host := strings.TrimPrefix(e.Key(), slotPrefix)
			s := new(hostSlots)
			if e.Operation() != jetstream.KeyValuePut || json.Unmarshal(e.Value(), s) != nil {
				s = &hostSlots{Host: host}
			}
			places[host] = s
		}
		seen := b.placesSeen
		b.waitingMu.Unlock()
		if seen {
			b.wakeAdmissible()
		}
	})
}

// placesOf returns host's places as the view has them while the places are watched (and
// true), or else as the bucket has them.
func (b *Broker) placesOf(ctx context.Context, host string) (*hostSlots, bool, error) {
	b.waitingMu.Lock()
	if b.placesSeen {
		s := b.places[host]
		b.waitingMu.Unlock()
		if s == nil {
			s = &hostSlots{Host: host}
		}
		return s, true, nil
	}
	b.waitingMu.Unlock()
	s, _, err := b.slots(ctx, host)
	return s, false, err
}

// room reports how many of s's places are held, how many by tenant, and whether migration id
// of tenant has one or may take one under limit (limit < 0: whatever the counts).
func (b *Broker) room(s *hostSlots, id, tenant string, limit int) (held, mine int, ok bool) {
	held = len(s.Migrations)
	if _, ok := s.Migrations[id]; ok {
		return held, 0, true
	}
	for other := range s.Migrations {
		if s.Tenants[other] == tenant {
			mine++
		}
	}
	return held, mine, limit < 0 || held < limit && mine < b.tenantShare(limit)
}

// slots reads host's places; a host without a record has all of them free (revision 0).
func (b *Broker) slots(ctx context.Context, host string) (*hostSlots, uint64, error) {
	s, rev, err := getJSON[hostSlots](ctx, b.store.fleet, slotPrefix+host)
	if errors.Is(err, ErrNotFound) {
		return &hostSlots{Host: host, Migrations: map[string]time.Time{}}, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading the places of host %s: %w", host, err)
	}
	if s.Migrations == nil {
		s.Migrations = map[string]time.Time{}
	}
	return s, rev, nil
}

// changeSlots applies change to host's places until the write wins a race; change returns
// false to write nothing.
func (b *Broker) changeSlots(ctx context.Context, host string, change func(*hostSlots) bool) error {
	for {
		s, rev, err := b.slots(ctx, host)
		if err != nil {
			return err
		}
		if !change(s) {
			return nil
		}
		if _, err := updateJSON(ctx, b.store.fleet, slotPrefix+host, s, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return fmt.Errorf("writing the places of host %s: %w", host, err)
		}
		return nil
	}
}

// takeSlot takes a place on host for migration id of tenant if b.room says there is one (limit
// < 0: whatever the counts). It reports how many were held, how many by tenant, and whether
// id holds one now.
func (b *Broker) takeSlot(ctx context.Context, host, id, tenant string, limit int) (int, int, bool, error) {
	held, mine, took := 0, 0, false
	err := b.changeSlots(ctx, host, func(s *hostSlots) bool {
		held, mine, took = b.room(s, id, tenant, limit)
		if _, holds := s.Migrations[id]; holds || !took {
			return false
		}
		s.Migrations[id] = b.now()
		if s.Tenants == nil {
			s.Tenants = map[string]string{}
		}
		s.Tenants[id] = tenant
		return true
	})
	return held, mine, took && err == nil, err
}

// giveSlot gives migration id's place on host back and wakes a migration waiting for it. A
// failure is logged: reclaim recovers the place.
func (b *Broker) giveSlot(ctx context.Context, host, id string) {
	gave := false
	err := b.changeSlots(ctx, host, func(s *hostSlots) bool {
		_, gave = s.Migrations[id]
		delete(s.Migrations, id)
		delete(s.Tenants, id)
		return gave
	})
	if err != nil {
		b.log.Warn("Giving a migration's place back failed", logKeyMigration, id, logKeyHost, host, logKeyError, err)
		return
	}
	if gave {
		b.wakeWaiting(host)
	}
}

// giveSlots gives migration id's places on hosts back.
func (b *Broker) giveSlots(ctx context.Context, id string, hosts ...string) {
	slices.Sort(hosts)
	for _, h := range slices.Compact(hosts) {
		if h != "" {
			b.giveSlot(ctx, h, id)
		}
	}
}

// staleSlot is how long a place must have been held before reclaim may judge it: longer
// than it takes every broker's listing of the migrations bucket to include a migration
// admitted by another broker (two listings: one may miss it).
func (b *Broker) staleSlot() time.Duration {
	return b.cfg.Lease + 3*b.cfg.CheckInterval
}

// reclaim drops host's places held for longer than staleSlot by migrations this broker's
// listing does not have as unfinished, and returns how many places are held after. It looks
// at most once per CheckInterval per host; between looks it returns held, the count the
// caller read.
func (b *Broker) reclaim(ctx context.Context, host string, held int) int {
	b.waitingMu.Lock()
	if b.reclaimed == nil {
		b.reclaimed = map[string]time.Time{}
	}
	now := b.now()
	if now.Sub(b.reclaimed[host]) < b.cfg.CheckInterval {
		b.waitingMu.Unlock()
		return held
	}
	b.reclaimed[host] = now
	b.waitingMu.Unlock()
	active := b.activeMigrations()
	cutoff := now.Add(-b.staleSlot())
	err := b.changeSlots(ctx, host, func(s *hostSlots) bool {
		n := len(s.Migrations)
		for id, at := range s.Migrations {
			if _, ok := active[id]; !ok && at.Before(cutoff) {
				delete(s.Migrations, id)
				delete(s.Tenants, id)
			}
		}
		held = len(s.Migrations)
		return held < n
	})
	if err != nil {
		b.log.Warn("Reclaiming places failed", logKeyHost, host, logKeyError, err)
	}
	return held
}

// moveSlot moves migration id's place from host from to host to, whatever to's count: a
// fallback to another destination of a migration admitted already.
func (b *Broker) moveSlot(ctx context.Context, id, tenant, from, to string) {
	if _, _, _, err := b.takeSlot(ctx, to, id, tenant, -1); err != nil {
		b.log.Warn("Taking a place on the next destination failed", logKeyMigration, id, logKeyHost, to, logKeyError, err)
	}
	b.giveSlot(ctx, from, id)
}

// queueReason returns why m, waiting in Requested, must be aborted now, or "".
func (b *Broker) queueReason(m *Migration, now time.Time) string {
	if now.Sub(m.Created) <= b.cfg.Timeouts.Queue {
		return ""
	}
	return fmt.Sprintf("timeout: not admitted within %v (%s)", b.cfg.Timeouts.Queue, cmp.Or(m.Waiting, "waiting"))
}
