package broker

import (
	"encoding/json"
	"time"

	"github.com/lethe-cc/lethe/internal/natsauth"
)

// AuditSchema names the version of AuditRecord's JSON form, the same schema version as the
// keybroker's audit events (keybroker.AuditSchema, docs/audit.md): fields may be added under
// it, never renamed, retyped or removed; a breaking change takes a new schema and a new subject
// prefix.
const AuditSchema = "lethe.audit/v1"

// AuditAction is what an operator or tenant did that the broker audits. Each is one NATS
// subject token: the record goes out on lethe.v1.audit.broker.<action> (AuditSubject).
type AuditAction string

// The broker's audited actions.
const (
	// AuditHostState: a host's state changed (cordoned, draining, drained, schedulable
	// again); State is the new state, Operation the fleet operation that set it, if any.
	AuditHostState AuditAction = "host-state"
	// AuditFleetStart, AuditFleetAbort and AuditFleetFinish: a fleet operation (drain,
	// evacuate, rebalance) started, was asked to abort, or ended; Target is the operation's
	// id, State its state, Detail its counts at the end.
	AuditFleetStart  AuditAction = "fleet-start"
	AuditFleetAbort  AuditAction = "fleet-abort"
	AuditFleetFinish AuditAction = "fleet-finish"
	// AuditPolicyApply: a signed policy was stored for a tenant or one of its guests; Target
	// is the policy's key.
	AuditPolicyApply AuditAction = "policy-apply"
	// AuditGuestAdopt: a guest was adopted on a host (its first memory key released there).
	AuditGuestAdopt AuditAction = "guest-adopt"
	// AuditGuestForget: the broker's record of a guest whose VM is gone was dropped; Host is
	// where it lived, Reason the caller's. Its key stays in the keybroker.
	AuditGuestForget AuditAction = "guest-forget"
	// AuditMigrationRequest and AuditMigrationAbort: a migration was requested, or a request
	// to abort it accepted; Target is the migration's id.
	AuditMigrationRequest AuditAction = "migration-request"
	AuditMigrationAbort   AuditAction = "migration-abort"
)

// AuditRecord is one of the broker's audit records: who did what to which target, and why.
// Its JSON field names are the schema AuditSchema documented in docs/audit.md.
type AuditRecord struct {
	// Schema is AuditSchema.
	Schema string      `json:"schema"`
	Action AuditAction `json:"action"`
	Time   time.Time   `json:"time"`
	// Broker is the id of the broker instance that recorded the action.
	Broker string `json:"broker"`
	// By is who asked: "operator" or "tenant:<name>" (Caller.String); for the end of a fleet
	// operation, who started it.
	By string `json:"by"`
	// Target is what the action was done to: a host name, a fleet operation's id, a policy's
	// key, a guest's key (GuestKey: tenant.vm), a migration's id.
	Target string `json:"target"`
	// Reason is the reason the caller gave, if any.
	Reason string `json:"reason,omitempty"`
	// Tenant, VM and Host name the guest and host concerned, where there is one.
	Tenant string `json:"tenant,omitempty"`
	VM     string `json:"vm,omitempty"`
	Host   string `json:"host,omitempty"`
	// State is a host's new state, a fleet operation's state, or the phase a migration was
	// in when its abort was accepted.
	State string `json:"state,omitempty"`
	// Operation is the fleet operation behind a host state or a migration, if any.
	Operation string `json:"operation,omitempty"`
	// Detail says more in words: a fleet operation's counts, a migration's destination.
	Detail string `json:"detail,omitempty"`
}

// AuditSubject returns the subject the broker publishes records of action on.
func AuditSubject(action AuditAction) string {
	return natsauth.BrokerAuditPrefix + "." + string(action)
}

// publishAudit publishes rec on its AuditSubject for stream LETHE_AUDIT. Like publishEvent
// it never blocks the action: a failure is logged and counted, and the action stands.
func (b *Broker) publishAudit(rec AuditRecord) {
	rec.Schema = AuditSchema
	rec.Time = b.now().UTC()
	rec.Broker = b.cfg.ID
	data, err := json.Marshal(rec)
	if err != nil {
		return
	}
	if err := b.nc.Publish(AuditSubject(rec.Action), data); err != nil {
		b.log.Warn("Publishing an audit record failed", "action", rec.Action, logKeyError, err)
		b.cfg.Metrics.NATSError(natsOpPublish)
	}
}
