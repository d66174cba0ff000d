package agentapi_test

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
)

// TestHeartbeatBoundedAndRetried sends heartbeats that a subscriber swallows without an
// answer, as a broker cut off from JetStream or a request lost with a NATS server does. Each
// must end within the Heartbeater's timeout (not agentapi.DefaultTimeout, the host's TTL), and
// the next go out after the retry interval, so that the host's record is rewritten as soon as
// a broker answers again.
func TestHeartbeatBoundedAndRetried(t *testing.T) {
	srv := natstest.Start(t, natstest.Options{})
	nc := srv.Connect(t)
	var seen atomic.Int32
	sub, err := nc.Subscribe(agentapi.HeartbeatSubject("h1"), func(*nats.Msg) { seen.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	hb, err := agentapi.NewHeartbeater(agentapi.HeartbeaterConfig{
		Conn: nc, Record: func() agentapi.HostRecord {
			return agentapi.HostRecord{Host: "h1", Platform: attest.PlatformEmulatedSEVSNP}
		},
		Interval: time.Hour, Timeout: 50 * time.Millisecond, RetryInterval: 10 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	err = hb.Beat(t.Context())
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("an unanswered heartbeat: %v, want its timeout", err)
	}
	if got := hb.Next(err); got != 10*time.Millisecond {
		t.Errorf("after a failed heartbeat the next waits %v, want the retry interval", got)
	}
	if got := hb.Next(nil); got != time.Hour {
		t.Errorf("after a heartbeat that went through the next waits %v, want the interval", got)
	}

	// Run, with an interval of an hour, sends again after the retry interval.
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- hb.Run(ctx) }()
	for seen.Load() < 4 {
		time.Sleep(10 * time.Millisecond) // polling the count of heartbeats seen
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}
