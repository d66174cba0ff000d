package main

import (
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/deploy"
	"github.com/lethe-cc/lethe/internal/daemon"
)

// TestOpsKitMetrics checks that the agent exports every agent metric the dashboard and the
// alert rules of deploy/ use.
func TestOpsKitMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	a := newAgentMetrics(m)
	// Give every vector a child, so that the registry gathers it.
	a.BytesSent(1)
	a.MigrationEnded(attest.RoleSource, "committed")
	a.LibvirtError("lookup")
	m.NATSError("publish")
	missing, err := deploy.Missing(m.Registry, deploy.OwnerAgent)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range missing {
		t.Errorf("the agent does not export %s", l)
	}
}
