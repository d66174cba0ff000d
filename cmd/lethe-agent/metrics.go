package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/migagent"
)

// agentMetrics implements migagent.Metrics on the daemon's registry.
type agentMetrics struct {
	bytesSent     prometheus.Counter
	migrations    *prometheus.CounterVec
	libvirtErrors *prometheus.CounterVec
}

var _ migagent.Metrics = (*agentMetrics)(nil)

// newAgentMetrics registers the agent's metrics on m and returns their hooks.
func newAgentMetrics(m *daemon.Metrics) *agentMetrics {
	a := &agentMetrics{
		bytesSent: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "agent", Name: "bytes_sent_total",
			Help: "Guest memory bytes (page payloads) this host sent as a migration source.",
		}),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "agent", Name: "migrations_total",
			Help: "Ends of this host's part in migrations, by role (source, destination) and outcome (committed, failed, aborted).",
		}, []string{"role", "outcome"}),
		libvirtErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "agent", Name: "libvirt_errors_total",
			Help: "Failed libvirt calls, by operation.",
		}, []string{"op"}),
	}
	m.Registry.MustRegister(a.bytesSent, a.migrations, a.libvirtErrors)
	return a
}

// BytesSent implements migagent.Metrics.
func (a *agentMetrics) BytesSent(n int64) {
	if n > 0 {
		a.bytesSent.Add(float64(n))
	}
}

// MigrationEnded implements migagent.Metrics.
func (a *agentMetrics) MigrationEnded(role attest.Role, outcome string) {
	a.migrations.WithLabelValues(string(role), outcome).Inc()
}

// LibvirtError implements migagent.Metrics.
func (a *agentMetrics) LibvirtError(op string) { a.libvirtErrors.WithLabelValues(op).Inc() }
