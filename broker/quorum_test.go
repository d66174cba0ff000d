package broker_test

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/nats-io/nats.go"
)

// TestUnavailableWithoutQuorum runs a broker on a 3-node cluster with 3 replicas and stops
// two nodes: the broker must say it is not ready, and answer its API "unavailable" with the
// cause, not "internal", so that callers and load balancers can tell a cluster without
// quorum from a bug.
func TestUnavailableWithoutQuorum(t *testing.T) {
	c := natstest.StartCluster(t, 3, natstest.Options{})
	// Every client stays on the node that keeps running.
	connect := func(role natsauth.Role) *nats.Conn {
		return c.Nodes[0].Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(role, "")))
	}
	b, err := broker.New(broker.Config{
		Conn: connect(natsauth.RoleBroker), StoreConn: connect(natsauth.RoleBrokerStore),
		KeyBroker: &brokertest.KeyBroker{}, Replicas: 3, CheckInterval: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-b.Ready():
	case err := <-done:
		done <- err // for the cleanup, which waits for it
		t.Fatalf("broker stopped before ready: %v", err)
	}
	if err := b.StoreReady(t.Context()); err != nil {
		t.Fatalf("ready with the whole cluster: %v", err)
	}

	c.Stop(1)
	c.Stop(2)
	deadline := time.Now().Add(30 * time.Second)
	var notReady error
	for notReady == nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // polling the condition: the stream's leader stepping down
		notReady = b.StoreReady(t.Context())
	}
	if !errors.Is(notReady, broker.ErrUnavailable) {
		t.Fatalf("without quorum, the broker's store readiness: %v, want unavailable", notReady)
	}

	client := broker.NewOperatorClient(connect(natsauth.RoleOperator))
	_, err = client.GetMigration(t.Context(), "m")
	if !errors.Is(err, broker.ErrUnavailable) || errors.Is(err, wireerr.CodeInternal) {
		t.Errorf("a read without quorum: %v, want unavailable with its cause", err)
	}
	t.Logf("without quorum: %v; the API answers: %v", notReady, err)
}
