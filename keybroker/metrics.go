package keybroker

import (
	"context"
	"errors"
	"time"
)

// Metrics receives the keybroker's measurements; cmd/lethe-keybroker exports them to
// Prometheus. Methods are called in the request path and must not block. Config.Metrics nil
// means none are taken.
type Metrics interface {
	// Decided records one audit event's outcome: its kind, its decision and, unless the
	// decision is DecisionAllow, the reason as ErrorCode names it ("denied",
	// "evidence_rejected", "nonce_expired", "unavailable", …). It is never given anything
	// that identifies a tenant, a guest or a migration.
	Decided(kind EventKind, decision Decision, reason string)
	// Released records how long one Release call took, with its decision.
	Released(decision Decision, d time.Duration)
	// VaultError records a Vault call that failed for want of Vault (unreachable, sealed,
	// a server error): what ErrVaultUnavailable wraps.
	VaultError()
}

// noMetrics takes no measurements.
type noMetrics struct{}

func (noMetrics) Decided(EventKind, Decision, string) {}
func (noMetrics) Released(Decision, time.Duration)    {}
func (noMetrics) VaultError()                         {}

// PendingDestructions returns how many destructions wait in the journal for Vault: the
// destruction backlog.
func (k *Keybroker) PendingDestructions() int { return len(k.jnl.pending()) }

// countVault classifies err as classify does and records a Vault error in m when Vault was
// unavailable (not when the caller's context ended).
func countVault(m Metrics, err error) error {
	err = classify(err)
	if m != nil && errors.Is(err, ErrVaultUnavailable) && !errors.Is(err, context.Canceled) {
		m.VaultError()
	}
	return err
}
