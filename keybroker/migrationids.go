package keybroker

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// migrationIDRecord binds a migration ID to the guest that used it first, in KV at
// migration-ids/<id>. It is created with check-and-set 0, so exactly one guest ever owns an
// ID, whichever keybroker claims it, and it is never deleted: an ID that ended stays ended.
//
// Key names and receipts are derived from the ID alone (lethe-mig-<id>, receipts/<id>), so
// without this record a request naming guest X and guest Y's migration ID would reach Y's
// migration key or receipt. Every path that derives a name from an ID (release, destroy, the
// journal's retries) claims the ID for its guest first.
type migrationIDRecord struct {
	Tenant    string    `json:"tenant"`
	VM        string    `json:"vm"`
	ClaimedAt time.Time `json:"claimedAt"`
	// Ended is set once the migration's receipt is stored: the ID is never released again.
	Ended   bool      `json:"ended,omitempty"`
	EndedAt time.Time `json:"endedAt,omitzero"`
}

func migrationIDPath(id string) string { return "migration-ids/" + id }

// claimMigrationID binds migration ID id to the guest tenant/vm, creating its record on first
// use, or checks that the record names that guest. With fresh (a release that would create
// keys) it also refuses an ID whose migration has ended. It returns an error wrapping
// ErrInvalidRequest for an ID that belongs to another guest or, with fresh, has ended;
// ErrGuestBusy if the record kept changing; or ErrVaultUnavailable.
func (k *Keybroker) claimMigrationID(ctx context.Context, id, tenant, vm string, fresh bool) error {
	for range 3 {
		var rec migrationIDRecord
		ver, err := k.recs.get(ctx, migrationIDPath(id), &rec)
		if err != nil {
			return fmt.Errorf("reading the record of migration id %s: %w", id, err)
		}
		if ver != 0 {
			switch {
			case rec.Tenant != tenant || rec.VM != vm:
				return fmt.Errorf("migration id %s belongs to another guest: %w", id, ErrInvalidRequest)
			case fresh && rec.Ended:
				return fmt.Errorf("migration %s has ended: %w", id, ErrInvalidRequest)
			}
			return nil
		}
		rec = migrationIDRecord{Tenant: tenant, VM: vm, ClaimedAt: k.now().UTC()}
		_, err = k.recs.put(ctx, migrationIDPath(id), &rec, 0)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errConflict) {
			return fmt.Errorf("claiming migration id %s: %w", id, err)
		}
		// Another request claimed it in between: check whose it is now.
	}
	return fmt.Errorf("claiming migration id %s: %w: %w", id, ErrGuestBusy, errConflict)
}

// endMigrationID marks migration ID id as ended, once its receipt is stored, so that no
// release reuses it. The ID must have been claimed. It returns ErrGuestBusy if the record
// kept changing, ErrVaultUnavailable, or an error if the ID has no record.
func (k *Keybroker) endMigrationID(ctx context.Context, id string) error {
	for range 3 {
		var rec migrationIDRecord
		ver, err := k.recs.get(ctx, migrationIDPath(id), &rec)
		if err != nil {
			return fmt.Errorf("reading the record of migration id %s: %w", id, err)
		}
		if ver == 0 {
			return fmt.Errorf("ending migration id %s: it was never claimed", id)
		}
		if rec.Ended {
			return nil
		}
		rec.Ended, rec.EndedAt = true, k.now().UTC()
		_, err = k.recs.put(ctx, migrationIDPath(id), &rec, ver)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errConflict) {
			return fmt.Errorf("ending migration id %s: %w", id, err)
		}
	}
	return fmt.Errorf("ending migration id %s: %w: %w", id, ErrGuestBusy, errConflict)
}
