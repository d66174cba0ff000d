package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/internal/natsauth"
)

// ArchiveBucket holds the ended migrations moved out of MigrationsBucket.
const ArchiveBucket = natsauth.ArchiveBucket

// The live set and the archive.
//
// Every broker looks at every record of MigrationsBucket at each check (reconcile, through
// its live view), so that bucket holds the live set only: the migrations in flight and those ended less than
// Config.EndedGrace ago. Reconcile moves an ended migration older than that to ArchiveBucket:
// it copies the record there and purges the key from MigrationsBucket up to the revision it
// copied (so a record changed meanwhile stays and is copied again later, never lost), leaving
// no delete marker for the next listing to read. ArchiveBucket keeps a record for Config.ArchiveRetention; migrations.get, .events
// and .abort read it there when the live bucket no longer has it, and migrations.list reads it
// when asked (ListMigrationsRequest.Archived).

// maxArchivedPerCheck bounds the migrations one check archives, so that a backlog (a broker
// upgraded onto a long history) is worked off over several checks instead of holding one up.
const maxArchivedPerCheck = 256

// ended says when m ended: its Finished time, or its last update for a record without one.
func ended(m *Migration) time.Time { return cmp.Or(m.Finished, m.Updated) }

// archiveEnded moves the ended migrations of recs (a listing of MigrationsBucket) that ended
// more than EndedGrace before now to the archive, at most maxArchivedPerCheck of them. A
// failure is logged; the next check tries again.
func (b *Broker) archiveEnded(ctx context.Context, recs []*Migration, now time.Time) {
	var stream jetstream.Stream
	n := 0
	for _, r := range recs {
		if n == maxArchivedPerCheck {
			return
		}
		if !r.Phase.Terminal() || now.Sub(ended(r)) < b.cfg.EndedGrace {
			continue
		}
		if stream == nil {
			var err error
			if stream, err = b.store.js.Stream(ctx, "KV_"+MigrationsBucket); err != nil {
				b.log.Warn("Opening the migrations' stream to archive ended migrations failed", logKeyError, err)
				return
			}
		}
		n++
		upTo, err := b.archive(ctx, stream, r.ID)
		if err != nil {
			if ctx.Err() == nil {
				b.log.Warn("Archiving an ended migration failed; the next check tries again", logKeyMigration, r.ID, logKeyError, err)
			}
			continue
		}
		// The purge leaves no marker for the watch to deliver: the view forgets the record
		// here (live.go).
		b.live.remove(r.ID, upTo)
		b.log.Debug("Migration archived", logKeyMigration, r.ID)
	}
}

// archive moves migration id, ended, from the live bucket to the archive: it copies the
// record, then purges the key's messages up to the revision it copied. A revision written
// after the copy (none is, to an ended migration, but nothing forbids it) stays, and the next
// check copies it again. The purge leaves no delete marker for the next listing to read.
// It returns the revision the key is purged up to: every revision, when another broker
// archived it first.
func (b *Broker) archive(ctx context.Context, stream jetstream.Stream, id string) (uint64, error) {
	e, err := b.store.migrations.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return math.MaxUint64, nil // archived by another broker
	}
	if err != nil {
		return 0, fmt.Errorf("reading migration: %w", err)
	}
	if _, err := b.store.archive.Put(ctx, id, e.Value()); err != nil {
		return 0, fmt.Errorf("writing %s: %w", ArchiveBucket, err)
	}
	err = stream.Purge(ctx, jetstream.WithPurgeSubject("$KV."+MigrationsBucket+"."+id), jetstream.WithPurgeSequence(e.Revision()+1))
	if err != nil {
		return 0, fmt.Errorf("purging from %s: %w", MigrationsBucket, err)
	}
	return e.Revision(), nil
}

// findMigration reads migration id from the live bucket, or from the archive if it was
// archived. The revision is the live bucket's, or 0 for an archived migration, which is ended
// and is never written again. A migration in neither matches ErrNotFound.
func (b *Broker) findMigration(ctx context.Context, id string) (*Migration, uint64, error) {
	m, rev, err := getJSON[Migration](ctx, b.store.migrations, id)
	if !errors.Is(err, ErrNotFound) {
		return m, rev, err
	}
	m, _, err = getJSON[Migration](ctx, b.store.archive, id)
	if errors.Is(err, ErrNotFound) {
		return nil, 0, fmt.Errorf("%w: migration %q", ErrNotFound, id)
	}
	return m, 0, err
}
