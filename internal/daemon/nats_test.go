package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/natstest"
)

// syncBuffer is a log sink safe for the concurrent writes of a test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestConnectWaitsForNATS starts a daemon's connection while its NATS server is down: it must
// log each failed attempt with the URL it tried and connect once the server is back, rather
// than fail the daemon at once.
func TestConnectWaitsForNATS(t *testing.T) {
	srv := natstest.Start(t, natstest.Options{})
	srv.Server.Shutdown()
	srv.Server.WaitForShutdown()

	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	type result struct {
		err  error
		conn bool
	}
	done := make(chan result, 1)
	go func() {
		nc, err := daemon.NATSClient{URL: srv.URL}.Connect(t.Context(), log, "test", "_INBOX.test")
		if nc != nil {
			nc.Close()
		}
		done <- result{err, nc != nil}
	}()
	for !strings.Contains(logs.String(), "Connecting to NATS failed") {
		time.Sleep(20 * time.Millisecond) // polling the log for the first failed attempt
	}
	if !strings.Contains(logs.String(), srv.URL) {
		t.Errorf("the failed attempt's log does not name %s:\n%s", srv.URL, logs.String())
	}
	srv.Restart()
	if r := <-done; r.err != nil || !r.conn {
		t.Errorf("connecting once the server is back: %v", r.err)
	}
}

// TestConnectGivesUpWithItsContext checks that a daemon stopped while NATS is unreachable
// stops trying, with an error that names the URL it tried.
func TestConnectGivesUpWithItsContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	const url = "nats://user:secret@127.0.0.1:1"
	_, err := daemon.NATSClient{URL: url}.Connect(ctx, slog.New(slog.DiscardHandler), "test", "_INBOX.test")
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "127.0.0.1:1") || strings.Contains(err.Error(), "secret") {
		t.Errorf("Connect with an ended context: %v, want the context's error naming the URL without its password", err)
	}
}
