package main

import (
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/deploy"
	"github.com/lethe-cc/lethe/internal/daemon"
)

// TestOpsKitMetrics checks that the broker exports every broker metric the dashboard and the
// alert rules of deploy/ use.
func TestOpsKitMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	b := newBrokerMetrics(m)
	// Give every vector a child, so that the registry gathers it.
	b.PhaseChanged(broker.PhaseCommitted, broker.PhaseErased, time.Second)
	b.Handshake(time.Second)
	b.Downtime(time.Second)
	b.Unfinished(nil)
	b.NATSError("publish")
	b.FleetGuest("drain", "moved", time.Second)
	b.FleetQueue(0, 0)
	missing, err := deploy.Missing(m.Registry, deploy.OwnerBroker)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range missing {
		t.Errorf("the broker does not export %s", l)
	}
}
