package main

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
	"github.com/lethe-cc/lethe/keybroker"
)

func TestKeybrokerMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	k := newKeybrokerMetrics(m)
	k.SetBacklog(func() int { return 2 })
	k.Decided(keybroker.EventRelease, keybroker.DecisionDeny, "denied")
	k.Decided(keybroker.EventRelease, keybroker.DecisionAllow, "")
	k.Released(keybroker.DecisionAllow, 20*time.Millisecond)
	k.VaultError()
	m.NATSError("async")

	want := `
# HELP lethe_keybroker_decisions_total Audit events by kind (release, adopt, reissue, destroy), decision (allow, deny, error) and reason (the error code of a denial or error; empty for allow).
# TYPE lethe_keybroker_decisions_total counter
lethe_keybroker_decisions_total{decision="allow",kind="release",reason=""} 1
lethe_keybroker_decisions_total{decision="deny",kind="release",reason="denied"} 1
# HELP lethe_keybroker_destruction_backlog Key destructions journaled and waiting for Vault.
# TYPE lethe_keybroker_destruction_backlog gauge
lethe_keybroker_destruction_backlog 2
# HELP lethe_keybroker_vault_errors_total Vault calls that failed for want of Vault: unreachable, sealed, or a server error.
# TYPE lethe_keybroker_vault_errors_total counter
lethe_keybroker_vault_errors_total 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want),
		"lethe_keybroker_decisions_total", "lethe_keybroker_destruction_backlog", "lethe_keybroker_vault_errors_total"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(m.Registry, "lethe_keybroker_release_duration_seconds"); n != 1 {
		t.Errorf("release duration series = %d, want 1", n)
	}
	daemontest.MetricsDocumented(t, m.Registry, 6)
}
