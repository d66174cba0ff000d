package broker

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// The live view.
//
// Each check (reconcile) looks at every record of MigrationsBucket: which migrations are
// unfinished (the metrics, placement), which nobody holds (takeover), which ended long enough
// ago to archive. Listing the bucket for it costs an ordered consumer and a copy of every
// record per check and broker; on a NATS cluster, that consumer is created and deleted through
// the meta leader every second, by every broker, however idle.
//
// So the broker keeps the records in memory, fed by the watch that already wakes the drivers
// (followMigrations), and lists the bucket only to fill the view: at the first check, after
// every new watch (a watch delivers updates from its creation on, so what changed while none
// ran is read again), and every RelistInterval. That interval bounds how long a change the
// watch cannot deliver stays wrong in the view: another broker's archive purges a record
// without a delete marker (archive.go), so this broker's view keeps the ended record until
// it lists again or tries to archive it and finds it gone. Nothing the view keeps wrong is
// acted on unchecked: a driver reads its record before each step, and takes a migration
// over only by a compare-and-swap on the revision it read.
type liveView struct {
	mu   sync.Mutex
	recs map[string]liveRecord
	// listed is when the last listing that filled recs began; zero before the first.
	listed time.Time
	// watching is when the watch that feeds recs began.
	watching time.Time
}

// liveRecord is a migration's record and the revision it was read at.
type liveRecord struct {
	m   *Migration
	rev uint64
}

func newLiveView() *liveView { return &liveView{recs: make(map[string]liveRecord)} }

// watchBegan says a new watch feeds the view from now: what changed before it began is read
// by the next listing.
func (v *liveView) watchBegan(now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.watching = now
}

// put records m at revision rev, unless the view has a later revision of it.
func (v *liveView) put(key string, m *Migration, rev uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if cur, ok := v.recs[key]; !ok || cur.rev < rev {
		v.recs[key] = liveRecord{m: m, rev: rev}
	}
}

// remove forgets the record of key up to revision rev: a record written after rev stays.
func (v *liveView) remove(key string, rev uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if cur, ok := v.recs[key]; ok && cur.rev <= rev {
		delete(v.recs, key)
	}
}

// due says the view must be filled by a listing before it is read at now.
func (v *liveView) due(now time.Time, every time.Duration) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.listed.IsZero() || v.listed.Before(v.watching) || now.Sub(v.listed) >= every
}

// fill replaces the view with a listing begun at began, when the watch had delivered up to
// revision watched. A record the view holds at a later revision than the listing's stays;
// so does one the listing lacks that the watch delivered after watched (written while the
// listing ran). Any other record the listing lacks is gone from the bucket.
func (v *liveView) fill(listed map[string]liveRecord, began time.Time, watched uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for key, cur := range v.recs {
		if l, ok := listed[key]; ok && l.rev >= cur.rev {
			continue
		}
		if _, ok := listed[key]; ok || cur.rev > watched {
			listed[key] = cur
		}
	}
	v.recs, v.listed = listed, began
}

// records returns the migrations the view holds.
func (v *liveView) records() []*Migration {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]*Migration, 0, len(v.recs))
	for _, r := range v.recs {
		out = append(out, r.m)
	}
	return out
}

// follow applies an entry of the migrations' watch to the view and returns the record it
// put (nil for a deletion or an undecodable record).
func (v *liveView) follow(e jetstream.KeyValueEntry) *Migration {
	switch e.Operation() {
	case jetstream.KeyValuePut:
		m := new(Migration)
		if json.Unmarshal(e.Value(), m) != nil {
			return nil
		}
		v.put(e.Key(), m, e.Revision())
		return m
	case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
		v.remove(e.Key(), e.Revision())
	}
	return nil
}

// liveRecords returns the live migrations for a check: the view, filled by a listing of the
// bucket first when it is due.
func (b *Broker) liveRecords(ctx context.Context) ([]*Migration, error) {
	now := time.Now()
	if b.live.due(now, b.cfg.RelistInterval) {
		watched := b.watched.Load()
		entries, err := listEntries[Migration](ctx, b.store.migrations, ">")
		if err != nil {
			return nil, err
		}
		listed := make(map[string]liveRecord, len(entries))
		for _, e := range entries {
			listed[e.key] = liveRecord{m: e.value, rev: e.rev}
		}
		b.live.fill(listed, now, watched)
	}
	return b.live.records(), nil
}
