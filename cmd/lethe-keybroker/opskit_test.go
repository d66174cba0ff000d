package main

import (
	"testing"
	"time"

	"github.com/lethe-cc/lethe/deploy"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/keybroker"
)

// TestOpsKitMetrics checks that the keybroker exports every keybroker metric the dashboard and
// the alert rules of deploy/ use.
func TestOpsKitMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	k := newKeybrokerMetrics(m)
	// Give every vector a child, so that the registry gathers it.
	k.Decided(keybroker.EventRelease, keybroker.DecisionDeny, "policy_denied")
	k.Released(keybroker.DecisionAllow, time.Second)
	k.VaultError()
	m.NATSError("publish")
	missing, err := deploy.Missing(m.Registry, deploy.OwnerKeybroker)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range missing {
		t.Errorf("the keybroker does not export %s", l)
	}
}
