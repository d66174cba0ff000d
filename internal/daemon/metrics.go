package daemon

import (
	"log/slog"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/lethe-cc/lethe/internal/version"
)

// MetricsNamespace prefixes every metric of Lethe (prometheus.Opts.Namespace).
const MetricsNamespace = "lethe"

// Buckets of the duration histograms, in seconds. They are shared, not copied: callers must
// not modify them.
var (
	// PhaseBuckets span a phase: from milliseconds (a step on one machine) to an hour (a
	// transfer of a large guest).
	PhaseBuckets = []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600}
	// RequestBuckets span a handshake or a release: attestation and Vault round trips.
	RequestBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}
)

// Metrics is a daemon's Prometheus registry (its own, never the global one) with the Go and
// process collectors, the build information and the NATS error counter every daemon has. Each daemon registers the
// implementation of its own package's metric hooks on Registry (cmd/lethe-broker,
// cmd/lethe-keybroker, cmd/lethe-agent), so that this package links none of those packages.
type Metrics struct {
	// Registry is what /metrics serves.
	Registry *prometheus.Registry

	natsErrors *prometheus.CounterVec
}

// NewMetrics returns a registry with the Go runtime and process collectors,
// lethe_build_info{version,revision,goversion} (always 1: which build of Lethe is running, as
// --version says) and lethe_nats_errors_total.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m := &Metrics{
		Registry: reg,
		natsErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace, Name: "nats_errors_total",
			Help: "NATS errors: asynchronous connection errors (op=async), disconnections (op=disconnect) and failed operations of the daemon (op=kv_read, kv_list, publish).",
		}, []string{"op"}),
	}
	build := version.Info()
	reg.MustRegister(m.natsErrors, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: MetricsNamespace, Name: "build_info",
		Help:        "Which build of Lethe is running (always 1): its version, VCS revision and Go release, as --version says.",
		ConstLabels: prometheus.Labels{"version": build.Version, "revision": build.Revision, "goversion": build.GoVersion},
	}, func() float64 { return 1 }))
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
