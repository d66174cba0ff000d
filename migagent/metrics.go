package migagent

import "github.com/lethe-cc/lethe/attest"

// Metrics receives the agent's measurements; cmd/lethe-agent exports them to Prometheus.
// Methods are called from the agent's goroutines and must not block. Config.Metrics nil means
// none are taken.
type Metrics interface {
	// BytesSent records page payload bytes a source transfer sent, when the transfer ends
	// (committed or not).
	BytesSent(n int64)
	// MigrationEnded records the end of this host's part in a migration: its role (source or
	// destination) and its outcome (OutcomeCommitted, OutcomeFailed or OutcomeAborted). A
	// transfer that failed and was then aborted is recorded twice, once for each.
	MigrationEnded(role attest.Role, outcome string)
	// LibvirtError records a failed libvirt call, named by op (for example "migrate",
	// "resume", "lookup").
	LibvirtError(op string)
}

// Outcomes of Metrics.MigrationEnded.
const (
	// OutcomeCommitted: the data plane committed (source: acknowledgement received;
	// destination: acknowledgement sent and guest resumed).
	OutcomeCommitted = "committed"
	// OutcomeFailed: the data plane failed; the broker aborts the migration.
	OutcomeFailed = "failed"
	// OutcomeAborted: the migration was aborted here (keys zeroized, the destination
	// scrubbed, the source's guest resumed).
	OutcomeAborted = "aborted"
)

// noMetrics takes no measurements.
type noMetrics struct{}

func (noMetrics) BytesSent(int64)                    {}
func (noMetrics) MigrationEnded(attest.Role, string) {}
func (noMetrics) LibvirtError(string)                {}

// Metrics returns the node's metric hooks (never nil), for components that run beside it
// such as a libvirt driver.
func (n *Node) Metrics() Metrics { return n.cfg.Metrics }
