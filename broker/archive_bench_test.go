package broker_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
)

// historyEnv starts a broker whose checks run only when the benchmark calls Reconcile, with
// ended migrations of tenant in its history: in the live bucket if inLive, else moved to the
// archive by as many checks as that takes. It returns the broker and one of the migrations.
func historyEnv(b *testing.B, ended int, inLive bool) (*env, *broker.Broker, string) {
	return historyEnvRelisting(b, ended, inLive, 0)
}

// historyEnvRelisting is historyEnv with the broker's RelistInterval (zero: its default).
func historyEnvRelisting(b *testing.B, ended int, inLive bool, relist time.Duration) (*env, *broker.Broker, string) {
	e := newEnv(b, natstest.Options{})
	e.cfg.Logger = discardLogger()
	e.cfg.CheckInterval = time.Hour
	e.cfg.RelistInterval = relist
	e.cfg.EndedGrace = time.Hour
	if inLive {
		e.cfg.EndedGrace = 1000 * time.Hour
	}
	br, _ := e.startBroker("bench")
	if ended == 0 {
		return e, br, ""
	}
	ids := seedMigrations(b, e.kv(broker.MigrationsBucket), tenant, ended, 1300, e.clock.Now().Add(-2*time.Hour-time.Duration(ended)*time.Second))
	if !inLive {
		for liveMessages(b, e) != 0 {
			br.Reconcile(context.Background())
		}
	}
	return e, br, ids[len(ids)/2]
}

// BenchmarkReconcile measures one check of the broker (the work done every CheckInterval)
// with no history, with 10,000 ended migrations archived, and with the same 10,000 left in
// the live bucket (what every check read before ended migrations were archived); the last
// twice: from the broker's live view, and listed from NATS at every check, as checks did
// before the view (RelistInterval shorter than a check). With the history archived, the
// first two cost the same.
func BenchmarkReconcile(b *testing.B) {
	for _, tc := range []struct {
		name   string
		ended  int
		inLive bool
		relist time.Duration
	}{
		{"ended=0", 0, false, 0},
		{"ended=10000/archived", 10000, false, 0},
		{"ended=10000/live", 10000, true, 0},
		{"ended=10000/live/listed-each-check", 10000, true, time.Nanosecond},
	} {
		_, br, _ := historyEnvRelisting(b, tc.ended, tc.inLive, tc.relist)
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				br.Reconcile(context.Background())
			}
		})
	}
}

// BenchmarkHistoryReads measures what a tenant reads with 10,000 ended migrations archived:
// one archived migration by id, a page of the live listing, and a page of the listing with
// the archive (which reads the whole archive).
func BenchmarkHistoryReads(b *testing.B) {
	e, _, id := historyEnv(b, 10000, false)
	c := e.tenant(tenant)
	ctx := context.Background()
	b.Run("get-archived", func(b *testing.B) {
		for b.Loop() {
			if _, err := c.GetMigration(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, archived := range []bool{false, true} {
		b.Run(fmt.Sprintf("list-page/archived=%t", archived), func(b *testing.B) {
			for b.Loop() {
				if _, err := c.ListMigrations(ctx, &broker.ListMigrationsRequest{Archived: archived}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
