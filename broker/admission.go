package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/lethe-cc/lethe/migagent/agentapi"
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

// slotPrefix keys a host's places in the fleet bucket: slot.<host> holds a hostSlots.
const slotPrefix = "slot."

// defaultMaxMigrationsPerHost is Config.MaxMigrationsPerHost's default.
const defaultMaxMigrationsPerHost = 64

// waitingNews is how often, at most, a waiting migration's record is rewritten to say what it
// waits for now.
const waitingNews = 30 * time.Second

// errWaiting is a migration waiting in Requested for a place: its driver looks again when a
// place is given back, or after waitingCheck.
var errWaiting = errors.New("waiting for admission")

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
	if rec, _, err := getJSON[agentapi.HostRecord](ctx, b.store.hosts, host); err == nil && rec.MaxMigrations > 0 {
		limit = min(limit, rec.MaxMigrations)
	}
	return limit
}

// stepAdmit moves m out of Requested when its source and destination each have a place for
// it, or records why it waits and returns errWaiting.
func (b *Broker) stepAdmit(ctx context.Context, m *Migration) error {
	hosts := []string{m.Source, m.Destination}
	limits := []int{b.hostLimit(ctx, m.Source), b.hostLimit(ctx, m.Destination)}
	// A look before any write: a host that is full costs no write.
	for i, h := range hosts {
		s, _, err := b.slots(ctx, h)
		if err != nil {
			return err
		}
		if _, held := s.Migrations[m.ID]; !held && len(s.Migrations) >= limits[i] {
			if n := b.reclaim(ctx, h, len(s.Migrations)); n < limits[i] {
				continue
			}
			return b.wait(ctx, m, fmt.Sprintf("waiting: host %s has %d migrations in flight, the most it takes", h, len(s.Migrations)))
		}
	}
	for i, h := range hosts {
		n, mine, took, err := b.takeSlot(ctx, h, m.ID, m.Tenant, limits[i])
		switch {
		case err == nil && !took && n < limits[i]:
			err = b.wait(ctx, m, fmt.Sprintf("waiting: tenant %s has %d migrations in flight on host %s, the most one tenant has there", m.Tenant, mine, h))
		case err == nil && !took:
			err = b.wait(ctx, m, fmt.Sprintf("waiting: host %s has %d migrations in flight, the most it takes", h, n))
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

// wait records reason on m, waiting in Requested, if it is news, and returns errWaiting.
func (b *Broker) wait(ctx context.Context, m *Migration, reason string) error {
	b.waitingMu.Lock()
	if b.waiting == nil {
		b.waiting = map[string]waiter{}
	}
	if _, ok := b.waiting[m.ID]; !ok {
		b.waiting[m.ID] = waiter{source: m.Source, destination: m.Destination, since: m.Created}
	}
	b.waitingMu.Unlock()
	// A migration waiting on two busy hosts would name one, then the other: the record
	// says what it waits for, rewritten at most every waitingNews.
	if m.Waiting == reason || m.Waiting != "" && b.now().Sub(m.Updated) < waitingNews {
		return errWaiting
	}
	if err := b.update(ctx, m.ID, PhaseRequested, func(m *Migration) { m.Waiting = reason }); err != nil {
		return err
	}
	b.log.Info("Migration waits for admission", logKeyMigration, m.ID, logKeyReason, reason)
	b.publishEvent(Event{MigrationID: m.ID, Kind: EventAudit, Phase: PhaseRequested, Message: reason})
	return errWaiting
}

// waiter is a migration this broker drives that waits for admission.
type waiter struct {
	source, destination string
	since               time.Time
}

// unwait forgets that migration id waits.
func (b *Broker) unwait(id string) {
	b.waitingMu.Lock()
	delete(b.waiting, id)
	b.waitingMu.Unlock()
}

// wakeWaiting wakes the driver of the migration that has waited longest for a place on host,
// now that one was given back there.
func (b *Broker) wakeWaiting(host string) {
	b.waitingMu.Lock()
	first, since := "", time.Time{}
	for id, w := range b.waiting {
		if (w.source == host || w.destination == host) && (first == "" || w.since.Before(since)) {
			first, since = id, w.since
		}
	}
	b.waitingMu.Unlock()
	if first != "" {
		b.drive(b.runCtx(), first)
	}
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

// takeSlot takes a place on host for migration id of tenant if fewer than limit are held and
// tenant holds fewer than b.tenantShare(limit) (limit < 0: whatever the counts). It reports how
// many were held, how many by tenant, and whether id holds one now.
func (b *Broker) takeSlot(ctx context.Context, host, id, tenant string, limit int) (int, int, bool, error) {
	held, mine, took := 0, 0, false
	err := b.changeSlots(ctx, host, func(s *hostSlots) bool {
		held, mine = len(s.Migrations), 0
		if _, ok := s.Migrations[id]; ok {
			took = true
			return false
		}
		for other := range s.Migrations {
			if s.Tenants[other] == tenant {
				mine++
			}
		}
		took = limit < 0 || held < limit && mine < b.tenantShare(limit)
		if took {
			s.Migrations[id] = b.now()
			if s.Tenants == nil {
				s.Tenants = map[string]string{}
			}
			s.Tenants[id] = tenant
		}
		return took
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
