package broker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
)

// liveMessages returns how many messages the live migrations bucket's stream holds: records,
// their history and delete markers, all of which a check's listing reads.
func liveMessages(t testing.TB, e *env) uint64 {
	t.Helper()
	s, err := e.jetstream().Stream(context.Background(), "KV_"+broker.MigrationsBucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// waitLiveEmpty polls the live migrations bucket until it holds no message at all, and fails
// the test after 30 s.
func waitLiveEmpty(t testing.TB, e *env) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for n := liveMessages(t, e); n != 0; n = liveMessages(t, e) {
		if time.Now().After(deadline) {
			t.Fatalf("the live migrations bucket still holds %d messages", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEndedMigrationsArchived runs a migration to its end and lets EndedGrace pass: the
// migration leaves the live bucket without a trace (no record, no delete marker), and the
// tenant still gets it, its events and its receipt, lists it with Archived, and cannot
// bring it back by aborting it. The broker runs with Lethe's NATS permissions: its store
// user's rights suffice to archive.
func TestEndedMigrationsArchived(t *testing.T) {
	e := authEnv(t)
	e.cfg.EndedGrace = time.Minute
	e.standard()
	e.agents["h1"].AutoCommit = true
	ctx := t.Context()
	c := e.tenant(tenant)

	resp, err := c.CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	const seeded = 30
	seedMigrations(t, e.kv(broker.MigrationsBucket), tenant, seeded, 1300, e.clock.Now())
	e.clock.Advance(time.Hour)
	waitLiveEmpty(t, e)

	m, err := c.GetMigration(ctx, id)
	if err != nil || m.Phase != broker.PhaseErased {
		t.Fatalf("archived migration: %+v, %v; want it, Erased", m, err)
	}
	if evs, err := c.MigrationEvents(ctx, &broker.MigrationEventsRequest{ID: id}); err != nil || len(evs.Events) == 0 {
		t.Errorf("events of the archived migration: %+v, %v; want some", evs, err)
	}
	if _, err := c.GetReceipt(ctx, id); err != nil {
		t.Errorf("receipt of the archived migration: %v", err)
	}
	if _, err := c.AbortMigration(ctx, &broker.AbortMigrationRequest{ID: id}); !errors.Is(err, broker.ErrConflict) {
		t.Errorf("aborting the archived migration: %v, want ErrConflict", err)
	}
	if n := liveMessages(t, e); n != 0 {
		t.Errorf("after an abort request the live bucket holds %d messages, want none", n)
	}

	live, err := c.ListAllMigrations(ctx, broker.ListMigrationsRequest{})
	if err != nil || len(live) != 0 {
		t.Errorf("live listing: %d migrations, %v; want none", len(live), err)
	}
	all, err := c.ListAllMigrations(ctx, broker.ListMigrationsRequest{Archived: true, Limit: 7})
	if err != nil || len(all) != seeded+1 {
		t.Errorf("listing with the archive: %d migrations, %v; want %d", len(all), err, seeded+1)
	}
	if other, err := e.tenant("globex").ListAllMigrations(ctx, broker.ListMigrationsRequest{Archived: true}); err != nil || len(other) != 0 {
		t.Errorf("another tenant lists %d archived migrations, %v; want none", len(other), err)
	}
	if _, err := e.tenant("globex").GetMigration(ctx, id); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("another tenant gets the archived migration: %v, want ErrNotFound", err)
	}

	st, err := e.kv(broker.ArchiveBucket).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.TTL() != 365*24*time.Hour {
		t.Errorf("archive TTL = %s, want the default 365 days", st.TTL())
	}
	if rs, err := e.kv(broker.ReceiptsBucket).Status(ctx); err != nil || rs.TTL() != 0 {
		t.Errorf("receipts TTL = %v, %v; want none (kept for ever)", rs, err)
	}
}
