package main

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/daemon"
)

// brokerMetrics implements broker.Metrics on the daemon's registry.
type brokerMetrics struct {
	m           *daemon.Metrics
	transitions *prometheus.CounterVec
	finished    *prometheus.CounterVec
	unfinished  *prometheus.GaugeVec
	durations   *prometheus.HistogramVec
	handshake   prometheus.Histogram
	downtime    prometheus.Histogram
	fleetGuests *prometheus.CounterVec
	fleetTime   *prometheus.HistogramVec
	fleetQueue  *prometheus.GaugeVec
}

var _ broker.Metrics = (*brokerMetrics)(nil)

// downtimeBuckets span the pauses worth telling apart: tens of milliseconds (what live
// migration aims at) to the minute a full-memory pass of a large guest would take.
var downtimeBuckets = []float64{.01, .025, .05, .1, .2, .3, .5, .9, 1.5, 3, 6, 15, 60}

// allPhases are the phases a migration can be in, so that the gauge of each is exported
// even at zero.
var allPhases = []broker.Phase{
	broker.PhaseRequested, broker.PhaseAttesting, broker.PhaseKeysReleased, broker.PhaseTransferring,
	broker.PhaseCuttingOver, broker.PhaseCommitted, broker.PhaseErased, broker.PhaseAborting, broker.PhaseAborted,
}

// newBrokerMetrics registers the broker's metrics on m and returns their hooks.
func newBrokerMetrics(m *daemon.Metrics) *brokerMetrics {
	b := &brokerMetrics{
		m: m,
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "broker", Name: "phase_transitions_total",
			Help: "Phase transitions this broker made, by phase left (from) and phase entered (to).",
		}, []string{"from", "to"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "broker", Name: "migrations_finished_total",
			Help: "Migrations this broker finished, by outcome (erased, aborted).",
		}, []string{"outcome"}),
		unfinished: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "broker", Name: "migrations",
			Help: "Unfinished migrations by phase, as this broker last saw the migration records (all brokers', not only its own).",
		}, []string{"phase"}),
		durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "broker", Name: "phase_duration_seconds",
			Help:    "Time migrations spent in a phase, recorded when this broker moved them out of it.",
			Buckets: daemon.PhaseBuckets,
		}, []string{"phase"}),
		handshake: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "broker", Name: "handshake_duration_seconds",
			Help:    "Latency of successful attestation handshakes: nonces, both agents' evidence and the keybroker's release, to the keys recorded.",
			Buckets: daemon.RequestBuckets,
		}),
		downtime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "migration", Name: "downtime_seconds",
			Help:    "How long guests were paused at cutover, as their sources measured it, for the migrations this broker committed.",
			Buckets: downtimeBuckets,
		}),
		fleetGuests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "fleet", Name: "guests_total",
			Help: "Guests of fleet operations (drain, evacuate, rebalance) this broker saw end, by kind and status (moved, failed, stuck, skipped).",
		}, []string{"kind", "status"}),
		fleetTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "fleet", Name: "guest_duration_seconds",
			Help:    "Time from the start of a fleet operation's migration to its end, by kind.",
			Buckets: daemon.PhaseBuckets,
		}, []string{"kind"}),
		fleetQueue: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: daemon.MetricsNamespace, Subsystem: "fleet", Name: "guests",
			Help: "Guests of unfinished fleet operations by status (waiting, migrating), as this broker last saw them all.",
		}, []string{"status"}),
	}
	m.Registry.MustRegister(b.transitions, b.finished, b.unfinished, b.durations, b.handshake, b.downtime, b.fleetGuests, b.fleetTime, b.fleetQueue)
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
func (b *brokerMetrics) PhaseChanged(from, to broker.Phase, inFrom time.Duration) {
	b.transitions.WithLabelValues(string(from), string(to)).Inc()
	b.durations.WithLabelValues(string(from)).Observe(inFrom.Seconds())
	switch to {
	case broker.PhaseErased:
		b.finished.WithLabelValues(broker.OutcomeErased).Inc()
	case broker.PhaseAborted:
		b.finished.WithLabelValues(broker.OutcomeAborted).Inc()
	}
}

// Downtime implements broker.Metrics.
func (b *brokerMetrics) Downtime(d time.Duration) { b.downtime.Observe(d.Seconds()) }

// Handshake implements broker.Metrics.
func (b *brokerMetrics) Handshake(d time.Duration) { b.handshake.Observe(d.Seconds()) }

// Unfinished implements broker.Metrics.
func (b *brokerMetrics) Unfinished(byPhase map[broker.Phase]int) {
	for _, p := range allPhases {
		if !p.Terminal() {
			b.unfinished.WithLabelValues(string(p)).Set(float64(byPhase[p]))
		}
	}
}

// NATSError implements broker.Metrics.
func (b *brokerMetrics) NATSError(op string) { b.m.NATSError(op) }

// FleetGuest implements broker.Metrics.
func (b *brokerMetrics) FleetGuest(kind, status string, d time.Duration) {
	b.fleetGuests.WithLabelValues(kind, status).Inc()
	if d > 0 {
		b.fleetTime.WithLabelValues(kind).Observe(d.Seconds())
	}
}

// FleetQueue implements broker.Metrics.
func (b *brokerMetrics) FleetQueue(waiting, migrating int) {
	b.fleetQueue.WithLabelValues("waiting").Set(float64(waiting))
	b.fleetQueue.WithLabelValues("migrating").Set(float64(migrating))
}
