package main

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
)

func TestAgentMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	a := newAgentMetrics(m)
	a.BytesSent(4096)
	a.BytesSent(-1) // ignored
	a.MigrationEnded(attest.RoleSource, "committed")
	a.LibvirtError("migrate")
	m.NATSError("async")

	want := `
# HELP lethe_agent_bytes_sent_total Guest memory bytes (page payloads) this host sent as a migration source.
# TYPE lethe_agent_bytes_sent_total counter
lethe_agent_bytes_sent_total 4096
# HELP lethe_agent_migrations_total Ends of this host's part in migrations, by role (source, destination) and outcome (committed, failed, aborted).
# TYPE lethe_agent_migrations_total counter
lethe_agent_migrations_total{outcome="committed",role="source"} 1
# HELP lethe_agent_libvirt_errors_total Failed libvirt calls, by operation.
# TYPE lethe_agent_libvirt_errors_total counter
lethe_agent_libvirt_errors_total{op="migrate"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want),
		"lethe_agent_bytes_sent_total", "lethe_agent_migrations_total", "lethe_agent_libvirt_errors_total"); err != nil {
		t.Error(err)
	}
	daemontest.MetricsDocumented(t, m.Registry, 5)
}
