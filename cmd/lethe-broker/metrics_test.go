package main

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
)

func TestBrokerMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	b := newBrokerMetrics(m)
	b.PhaseChanged(broker.PhaseCommitted, broker.PhaseErased, 2*time.Second)
	b.Handshake(150 * time.Millisecond)
	b.Downtime(40 * time.Millisecond)
	b.Unfinished(map[broker.Phase]int{broker.PhaseTransferring: 3})
	b.NATSError("publish")

	want := `
# HELP lethe_broker_phase_transitions_total Phase transitions this broker made, by phase left (from) and phase entered (to).
# TYPE lethe_broker_phase_transitions_total counter
lethe_broker_phase_transitions_total{from="Committed",to="Erased"} 1
# HELP lethe_broker_migrations_finished_total Migrations this broker finished, by outcome (erased, aborted).
# TYPE lethe_broker_migrations_finished_total counter
lethe_broker_migrations_finished_total{outcome="aborted"} 0
lethe_broker_migrations_finished_total{outcome="erased"} 1
# HELP lethe_broker_migrations Unfinished migrations by phase, as this broker last saw the migration records (all brokers', not only its own).
# TYPE lethe_broker_migrations gauge
lethe_broker_migrations{phase="Aborting"} 0
lethe_broker_migrations{phase="Attesting"} 0
lethe_broker_migrations{phase="Committed"} 0
lethe_broker_migrations{phase="CuttingOver"} 0
lethe_broker_migrations{phase="KeysReleased"} 0
lethe_broker_migrations{phase="Requested"} 0
lethe_broker_migrations{phase="Transferring"} 3
# HELP lethe_nats_errors_total NATS errors: asynchronous connection errors (op=async), disconnections (op=disconnect) and failed operations of the daemon (op=kv_read, kv_list, publish).
# TYPE lethe_nats_errors_total counter
lethe_nats_errors_total{op="publish"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want),
		"lethe_broker_phase_transitions_total", "lethe_broker_migrations_finished_total", "lethe_broker_migrations", "lethe_nats_errors_total"); err != nil {
		t.Error(err)
	}
	for name, n := range map[string]int{"lethe_broker_phase_duration_seconds": 1, "lethe_broker_handshake_duration_seconds": 1, "lethe_migration_downtime_seconds": 1} {
		if got := testutil.CollectAndCount(m.Registry, name); got != n {
			t.Errorf("%s: %d series, want %d", name, got, n)
		}
	}
	daemontest.MetricsDocumented(t, m.Registry, 8)
}
