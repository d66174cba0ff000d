package broker_test

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
)

// TestChecksReadTheView runs an idle broker for fifty checks and counts the consumers made on
// the migrations' stream (each listing of the bucket makes one): with the live view, the
// watch and one listing, not one listing per check; with a RelistInterval of five checks,
// about one listing per five.
func TestChecksReadTheView(t *testing.T) {
	for _, tc := range []struct {
		name     string
		relist   time.Duration
		min, max int32
	}{
		{"default interval", 0, 1, 3},
		{"every five checks", 5 * 20 * time.Millisecond, 5, 14},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, natstest.Options{})
			e.cfg.CheckInterval = 20 * time.Millisecond
			e.cfg.RelistInterval = tc.relist
			var made atomic.Int32
			nc := e.srv.Connect(t)
			for _, subj := range []string{"$JS.API.CONSUMER.CREATE.KV_" + broker.MigrationsBucket, "$JS.API.CONSUMER.CREATE.KV_" + broker.MigrationsBucket + ".>"} {
				if _, err := nc.Subscribe(subj, func(*nats.Msg) { made.Add(1) }); err != nil {
					t.Fatal(err)
				}
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			e.startBroker("idle")
			time.Sleep(50 * e.cfg.CheckInterval)
			if n := made.Load(); n < tc.min || n > tc.max {
				t.Errorf("%d consumers made on the migrations' stream in fifty checks, want %d to %d", n, tc.min, tc.max)
			}
		})
	}
}
