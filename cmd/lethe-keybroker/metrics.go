package main

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/keybroker"
)

// keybrokerMetrics implements keybroker.Metrics on the daemon's registry.
type keybrokerMetrics struct {
	decisions   *prometheus.CounterVec
	releases    *prometheus.HistogramVec
	vaultErrors prometheus.Counter

	mu      sync.Mutex
	backlog func() int
}

var _ keybroker.Metrics = (*keybrokerMetrics)(nil)

// newKeybrokerMetrics registers the keybroker's metrics on m and returns their hooks. The
// destruction backlog gauge reads the function given to SetBacklog (the keybroker's
// PendingDestructions), which is made after the hooks.
func newKeybrokerMetrics(m *daemon.Metrics) *keybrokerMetrics {
	k := &keybrokerMetrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "keybroker", Name: "decisions_total",
			Help: "Audit events by kind (release, adopt, reissue, destroy), decision (allow, deny, error) and reason (the error code of a denial or error; empty for allow).",
		}, []string{"kind", "decision", "reason"}),
		releases: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "keybroker", Name: "release_duration_seconds",
			Help:    "Latency of key release requests, by decision.",
			Buckets: daemon.RequestBuckets,
		}, []string{"decision"}),
		vaultErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "keybroker", Name: "vault_errors_total",
			Help: "Vault calls that failed for want of Vault: unreachable, sealed, or a server error.",
		}),
	}
	backlog := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: daemon.MetricsNamespace, Subsystem: "keybroker", Name: "destruction_backlog",
		Help: "Key destructions journaled and waiting for Vault.",
	}, func() float64 {
		k.mu.Lock()
		f := k.backlog
		k.mu.Unlock()
		if f == nil {
			return 0
		}
		return float64(f())
	})
	m.Registry.MustRegister(k.decisions, k.releases, k.vaultErrors, backlog)
	return k
}

// SetBacklog sets the function the destruction backlog gauge reads.
func (k *keybrokerMetrics) SetBacklog(f func() int) {
	k.mu.Lock()
	k.backlog = f
	k.mu.Unlock()
}

// Decided implements keybroker.Metrics.
func (k *keybrokerMetrics) Decided(kind keybroker.EventKind, decision keybroker.Decision, reason string) {
	k.decisions.WithLabelValues(string(kind), string(decision), reason).Inc()
}

// Released implements keybroker.Metrics.
func (k *keybrokerMetrics) Released(decision keybroker.Decision, d time.Duration) {
	k.releases.WithLabelValues(string(decision)).Observe(d.Seconds())
}

// VaultError implements keybroker.Metrics.
func (k *keybrokerMetrics) VaultError() { k.vaultErrors.Inc() }
