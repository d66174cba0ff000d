package keybroker

import (
	"context"
	"log/slog"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// AuditSink receives one Event per release, adoption, denial and destruction. Audit must not
// block for long: it runs in the request path.
type AuditSink interface {
	Audit(ctx context.Context, ev Event)
}

// AuditSchema names the version of Event's JSON form (docs/audit.md): fields may be added
// under it, never renamed, retyped or removed; a breaking change takes a new schema and a new
// subject prefix.
const AuditSchema = "lethe.audit/v1"

// AuditSinks is an AuditSink that hands each event to every sink in turn (the log and the
// audit stream, say).
type AuditSinks []AuditSink

// Audit implements AuditSink.
func (s AuditSinks) Audit(ctx context.Context, ev Event) {
	for _, sink := range s {
		sink.Audit(ctx, ev)
	}
}

// EventKind is what an audit event records.
type EventKind string

// The kinds of audit events.
const (
	EventRelease EventKind = "release"
	EventAdopt   EventKind = "adopt"
	EventReissue EventKind = "reissue"
	EventDestroy EventKind = "destroy"
	// EventForget: a guest was forgotten on a signed statement (its tenant's or an admin's):
	// its live epoch's key destroyed (Keys), or the request refused.
	EventForget EventKind = "forget"
)

// Decision is the outcome an audit event records.
type Decision string

// The decisions of audit events.
const (
	// DecisionAllow: keys were released or destroyed.
	DecisionAllow Decision = "allow"
	// DecisionDeny: the request was refused (evidence, nonce, policy, state).
	DecisionDeny Decision = "deny"
	// DecisionError: the request failed for want of Vault or another dependency; nothing was
	// released.
	DecisionError Decision = "error"
)

// Event is one audit record. It carries digests, never keys, tokens, sealed blobs or raw
// evidence. Its JSON field names are the schema AuditSchema documented in docs/audit.md.
type Event struct {
	// Schema is AuditSchema, set on every event the keybroker emits.
	Schema      string    `json:"schema"`
	Kind        EventKind `json:"kind"`
	Time        time.Time `json:"time"`
	MigrationID string    `json:"migrationId"`
	Tenant      string    `json:"tenant"`
	VM          string    `json:"vm"`
	// Host is the destination host a release names (its denial says which host was refused).
	Host     string   `json:"host,omitempty"`
	Decision Decision `json:"decision"`
	// Reasons say why a request was denied or failed, one rule or failure each.
	Reasons []string `json:"reasons,omitempty"`

	SourceEvidence      attest.HexBytes `json:"sourceEvidence,omitempty"`
	DestinationEvidence attest.HexBytes `json:"destinationEvidence,omitempty"`
	ErasureEvidence     attest.HexBytes `json:"erasureEvidence,omitempty"`
	PolicyDigest        attest.HexBytes `json:"policyDigest,omitempty"`
	PolicySVN           uint64          `json:"policySvn,omitempty"`
	// Epoch is the epoch whose key the event released (release, adoption) or the epochs'
	// keys destroyed are named in Keys.
	Epoch uint64   `json:"epoch,omitempty"`
	Keys  []string `json:"keys,omitempty"`
	// By is who signed a forget's statement ("admin" or "tenant"), Reason why it says.
	By     string `json:"by,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// SlogAudit is an AuditSink that writes each event as one structured log record at level
// Info (Warn for denials and errors).
type SlogAudit struct {
	Logger *slog.Logger
}

// Audit implements AuditSink.
func (s SlogAudit) Audit(ctx context.Context, ev Event) {
	lvl := slog.LevelInfo
	if ev.Decision != DecisionAllow {
		lvl = slog.LevelWarn
	}
	attrs := []slog.Attr{
		slog.String(attrEvent, string(ev.Kind)),
		slog.String(attrMigration, ev.MigrationID),
		slog.String(attrTenant, ev.Tenant),
		slog.String(attrVM, ev.VM),
		slog.String(attrDecision, string(ev.Decision)),
	}
	if ev.Host != "" {
		attrs = append(attrs, slog.String(attrHost, ev.Host))
	}
	if len(ev.Reasons) > 0 {
		attrs = append(attrs, slog.Any(attrReasons, ev.Reasons))
	}
	for _, a := range []struct {
		k string
		v attest.HexBytes
	}{{attrSourceDigest, ev.SourceEvidence}, {attrDestinationDigest, ev.DestinationEvidence}, {attrErasureDigest, ev.ErasureEvidence}, {attrPolicyDigest, ev.PolicyDigest}} {
		if len(a.v) > 0 {
			attrs = append(attrs, slog.String(a.k, a.v.String()))
		}
	}
	if ev.PolicySVN > 0 {
		attrs = append(attrs, slog.Uint64(attrPolicySVN, ev.PolicySVN))
	}
	if ev.Epoch > 0 {
		attrs = append(attrs, slog.Uint64(attrEpoch, ev.Epoch))
	}
	if len(ev.Keys) > 0 {
		attrs = append(attrs, slog.Any(attrKeys, ev.Keys))
	}
	s.Logger.LogAttrs(ctx, lvl, "Audit", attrs...)
}
