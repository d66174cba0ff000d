package daemon

import (
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker"
)

// namespace prefixes every metric of Lethe.
const namespace = "lethe"

// Buckets of the duration histograms, in seconds.
var (
	// phaseBuckets span a phase: from milliseconds (a step on one machine) to an hour (a
	// transfer of a large guest).
	phaseBuckets = []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600}
	// requestBuckets span a handshake or a release: attestation and Vault round trips.
	requestBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}
)

// Metrics is a daemon's Prometheus registry (its own, never the global one) with the Go and
// process collectors and the NATS error counter every daemon has. Its Broker, Keybroker and
// Agent methods register and return the implementations of those packages' metric hooks.
type Metrics struct {
	// Registry is what /metrics serves.
	Registry *prometheus.Registry

	natsErrors *prometheus.CounterVec
}

// NewMetrics returns a registry with the Go runtime and process collectors and
// lethe_nats_errors_total.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m := &Metrics{
		Registry: reg,
		natsErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "nats_errors_total",
			Help: "NATS errors: asynchronous connection errors (op=async), disconnections (op=disconnect) and failed operations of the daemon (op=kv_read, kv_list, publish).",
		}, []string{"op"}),
	}
	reg.MustRegister(m.natsErrors)
	return m
}

// NATSError counts a NATS error named by op.
func (m *Metrics) NATSError(op string) { m.natsErrors.WithLabelValues(op).Inc() }

// NATSOptions returns connection options that count the connection's asynchronous errors
// and disconnections and log them, with its reconnections, on log.
func (m *Metrics) NATSOptions(log *slog.Logger) []nats.Option {
	log = log.With(attrComponent, "nats")
	return []nats.Option{
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			m.NATSError("async")
			log.Warn("NATS error", attrError, err)
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil {
				return // a deliberate close
			}
			m.NATSError("disconnect")
			log.Warn("Disconnected from NATS", attrError, err)
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			log.Info("Reconnected to NATS", attrURL, c.ConnectedUrlRedacted())
		}),
	}
}

// BrokerMetrics implements broker.Metrics.
type BrokerMetrics struct {
	m           *Metrics
	transitions *prometheus.CounterVec
	finished    *prometheus.CounterVec
	unfinished  *prometheus.GaugeVec
	durations   *prometheus.HistogramVec
	handshake   prometheus.Histogram
}

var _ broker.Metrics = (*BrokerMetrics)(nil)

// allPhases are the phases a migration can be in, so that the gauge of each is exported
// even at zero.
var allPhases = []broker.Phase{
	broker.PhaseRequested, broker.PhaseAttesting, broker.PhaseKeysReleased, broker.PhaseTransferring,
	broker.PhaseCuttingOver, broker.PhaseCommitted, broker.PhaseErased, broker.PhaseAborting, broker.PhaseAborted,
}

// Broker registers the broker's metrics and returns their hooks.
func (m *Metrics) Broker() *BrokerMetrics {
	b := &BrokerMetrics{
		m: m,
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "broker", Name: "phase_transitions_total",
			Help: "Phase transitions this broker made, by phase left (from) and phase entered (to).",
		}, []string{"from", "to"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "broker", Name: "migrations_finished_total",
			Help: "Migrations this broker finished, by outcome (erased, aborted).",
		}, []string{"outcome"}),
		unfinished: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "broker", Name: "migrations",
			Help: "Unfinished migrations by phase, as this broker last saw the migration records (all brokers', not only its own).",
		}, []string{"phase"}),
		durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "broker", Name: "phase_duration_seconds",
			Help:    "Time migrations spent in a phase, recorded when this broker moved them out of it.",
			Buckets: phaseBuckets,
		}, []string{"phase"}),
		handshake: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "broker", Name: "handshake_duration_seconds",
			Help:    "Latency of successful attestation handshakes: nonces, both agents' evidence and the keybroker's release, to the keys recorded.",
			Buckets: requestBuckets,
		}),
	}
	m.Registry.MustRegister(b.transitions, b.finished, b.unfinished, b.durations, b.handshake)
	for _, p := range allPhases {
		if !p.Terminal() {
			b.unfinished.WithLabelValues(string(p)).Set(0)
		}
	}
	for _, o := range []string{broker.OutcomeErased, broker.OutcomeAborted} {
		b.finished.WithLabelValues(o)
	}
	return b
}

// PhaseChanged implements broker.Metrics.
func (b *BrokerMetrics) PhaseChanged(from, to broker.Phase, inFrom time.Duration) {
	b.transitions.WithLabelValues(string(from), string(to)).Inc()
	b.durations.WithLabelValues(string(from)).Observe(inFrom.Seconds())
	switch to {
	case broker.PhaseErased:
		b.finished.WithLabelValues(broker.OutcomeErased).Inc()
	case broker.PhaseAborted:
		b.finished.WithLabelValues(broker.OutcomeAborted).Inc()
	}
}

// Handshake implements broker.Metrics.
func (b *BrokerMetrics) Handshake(d time.Duration) { b.handshake.Observe(d.Seconds()) }

// Unfinished implements broker.Metrics.
func (b *BrokerMetrics) Unfinished(byPhase map[broker.Phase]int) {
	for _, p := range allPhases {
		if !p.Terminal() {
			b.unfinished.WithLabelValues(string(p)).Set(float64(byPhase[p]))
		}
	}
}

// NATSError implements broker.Metrics.
func (b *BrokerMetrics) NATSError(op string) { b.m.NATSError(op) }

// KeybrokerMetrics implements keybroker.Metrics.
type KeybrokerMetrics struct {
	decisions   *prometheus.CounterVec
	releases    *prometheus.HistogramVec
	vaultErrors prometheus.Counter

	mu      sync.Mutex
	backlog func() int
}

var _ keybroker.Metrics = (*KeybrokerMetrics)(nil)

// Keybroker registers the keybroker's metrics and returns their hooks. The destruction
// backlog gauge reads the function given to SetBacklog (the keybroker's
// PendingDestructions), which is made after the hooks.
func (m *Metrics) Keybroker() *KeybrokerMetrics {
	k := &KeybrokerMetrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "keybroker", Name: "decisions_total",
			Help: "Audit events by kind (release, adopt, reissue, destroy), decision (allow, deny, error) and reason (the error code of a denial or error; empty for allow).",
		}, []string{"kind", "decision", "reason"}),
		releases: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "keybroker", Name: "release_duration_seconds",
			Help:    "Latency of key release requests, by decision.",
			Buckets: requestBuckets,
		}, []string{"decision"}),
		vaultErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "keybroker", Name: "vault_errors_total",
			Help: "Vault calls that failed for want of Vault: unreachable, sealed, or a server error.",
		}),
	}
	backlog := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: "keybroker", Name: "destruction_backlog",
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
func (k *KeybrokerMetrics) SetBacklog(f func() int) {
	k.mu.Lock()
	k.backlog = f
	k.mu.Unlock()
}

// Decided implements keybroker.Metrics.
func (k *KeybrokerMetrics) Decided(kind keybroker.EventKind, decision keybroker.Decision, reason string) {
	k.decisions.WithLabelValues(string(kind), string(decision), reason).Inc()
}

// Released implements keybroker.Metrics.
func (k *KeybrokerMetrics) Released(decision keybroker.Decision, d time.Duration) {
	k.releases.WithLabelValues(string(decision)).Observe(d.Seconds())
}

// VaultError implements keybroker.Metrics.
func (k *KeybrokerMetrics) VaultError() { k.vaultErrors.Inc() }

// AgentMetrics implements migagent.Metrics (package migagent), which cmd/lethe-agent checks
// where it hands it to the agent.
type AgentMetrics struct {
	bytesSent     prometheus.Counter
	migrations    *prometheus.CounterVec
	libvirtErrors *prometheus.CounterVec
}

// Agent registers the agent's metrics and returns their hooks.
func (m *Metrics) Agent() *AgentMetrics {
	a := &AgentMetrics{
		bytesSent: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "agent", Name: "bytes_sent_total",
			Help: "Guest memory bytes (page payloads) this host sent as a migration source.",
		}),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "agent", Name: "migrations_total",
			Help: "Ends of this host's part in migrations, by role (source, destination) and outcome (committed, failed, aborted).",
		}, []string{"role", "outcome"}),
		libvirtErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "agent", Name: "libvirt_errors_total",
			Help: "Failed libvirt calls, by operation.",
		}, []string{"op"}),
	}
	m.Registry.MustRegister(a.bytesSent, a.migrations, a.libvirtErrors)
	return a
}

// BytesSent implements node.Metrics.
func (a *AgentMetrics) BytesSent(n int64) {
	if n > 0 {
		a.bytesSent.Add(float64(n))
	}
}

// MigrationEnded implements node.Metrics.
func (a *AgentMetrics) MigrationEnded(role attest.Role, outcome string) {
	a.migrations.WithLabelValues(string(role), outcome).Inc()
}

// LibvirtError implements node.Metrics.
func (a *AgentMetrics) LibvirtError(op string) { a.libvirtErrors.WithLabelValues(op).Inc() }
