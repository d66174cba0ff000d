package broker

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// endingKV is a migrations bucket whose watches end at once or cannot be made, but the last.
type endingKV struct {
	jetstream.KeyValue
	watches atomic.Int32
	// last is the watch after which they stay.
	last int32
	// live is the updates of the watch that stays.
	live chan jetstream.KeyValueEntry
}

func (kv *endingKV) Watch(context.Context, string, ...jetstream.WatchOpt) (jetstream.KeyWatcher, error) {
	switch n := kv.watches.Add(1); {
	case n == kv.last:
		return &fakeWatcher{updates: kv.live}, nil
	case n%2 == 0:
		return nil, context.DeadlineExceeded
	default:
		ended := make(chan jetstream.KeyValueEntry)
		close(ended)
		return &fakeWatcher{updates: ended}, nil
	}
}

type fakeWatcher struct{ updates chan jetstream.KeyValueEntry }

func (w *fakeWatcher) Updates() <-chan jetstream.KeyValueEntry { return w.updates }
func (w *fakeWatcher) Stop() error                             { return nil }

// TestWatchMigrationsAgain ends the broker's watch of the migrations, and fails its creation:
// the broker must watch again each time, until a watch stays, and stop when its context ends.
// Its pauses between watches pass in a synctest bubble's time.
func TestWatchMigrationsAgain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		kv := &endingKV{last: 4, live: make(chan jetstream.KeyValueEntry)}
		b := &Broker{store: &store{migrations: kv}, log: slog.New(slog.DiscardHandler), live: newLiveView()}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- b.watchMigrations(ctx, nil) }()
		// Longer than every pause before the last watch together; then it follows that one.
		time.Sleep(time.Minute)
		synctest.Wait()
		if n := kv.watches.Load(); n != kv.last {
			t.Errorf("%d watches made, want %d: a watch that stays must be followed", n, kv.last)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("watchMigrations: %v", err)
		}
	})
}
