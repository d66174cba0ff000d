package broker

import "time"

// Metrics receives the broker's measurements; cmd/lethe-broker exports them to Prometheus.
// Methods are called from the broker's goroutines and must not block. Config.Metrics nil
// means none are taken.
type Metrics interface {
	// PhaseChanged records that this broker moved a migration from phase from to phase to
	// after it spent inFrom in from. A move to Erased or Aborted is the migration's outcome.
	PhaseChanged(from, to Phase, inFrom time.Duration)
	// Handshake records the latency of one successful attestation handshake: nonces, both
	// agents' evidence and the keybroker's release, up to the keys being recorded.
	Handshake(d time.Duration)
	// Downtime records how long the guest of a migration this broker committed was paused,
	// as its source measured it.
	Downtime(d time.Duration)
	// Unfinished records how many unfinished migrations are in each phase, as the broker last
	// saw the whole record bucket (every broker sees all migrations, not only its own).
	Unfinished(byPhase map[Phase]int)
	// NATSError records a failed NATS or JetStream operation of the broker, named by op
	// ("kv_read", "kv_list", "kv_write", "publish"), or a request refused for a reply subject outside its
	// caller's inbox ("reply_refused").
	NATSError(op string)
	// FleetGuest records that a guest of a fleet operation of kind (drain, evacuate,
	// rebalance) ended in status (moved, failed, stuck, skipped) after d in flight (zero if
	// its migration never started).
	FleetGuest(kind, status string, d time.Duration)
	// FleetQueue records the guests of unfinished fleet operations waiting and migrating, as
	// the broker last saw them all.
	FleetQueue(waiting, migrating int)
}

// The ops of Metrics.NATSError.
const (
	natsOpKVRead  = "kv_read"
	natsOpKVList  = "kv_list"
	natsOpPublish = "publish"
	natsOpKVWrite = "kv_write"
	// natsOpReplyRefused counts requests dropped for their reply subject.
	natsOpReplyRefused = "reply_refused"
)

// noMetrics takes no measurements.
type noMetrics struct{}

func (noMetrics) PhaseChanged(Phase, Phase, time.Duration) {}
func (noMetrics) Handshake(time.Duration)                  {}
func (noMetrics) Downtime(time.Duration)                   {}
func (noMetrics) Unfinished(map[Phase]int)                 {}
func (noMetrics) NATSError(string)                         {}
func (noMetrics) FleetGuest(string, string, time.Duration) {}
func (noMetrics) FleetQueue(int, int)                      {}
