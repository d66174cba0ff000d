package keybroker

import (
	"errors"

	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// The keybroker's requests and responses: the wire contract of package kbwire, under the
// names the keybroker's API has always used.
type (
	// Host describes the host an agent runs on, as the provider registered it.
	Host = kbwire.Host
	// NonceRequest asks for a nonce for one role of a migration (or adoption).
	NonceRequest = kbwire.NonceRequest
	// NonceResponse carries a fresh nonce and when it expires.
	NonceResponse = kbwire.NonceResponse
	// Attestation is one agent's evidence and the nonce it was made for.
	Attestation = kbwire.Attestation
	// ReleaseRequest asks for the keys of a migration.
	ReleaseRequest = kbwire.ReleaseRequest
	// ReleaseResponse carries the keys of a migration, sealed to each agent.
	ReleaseResponse = kbwire.ReleaseResponse
	// ReleaseTimings break a release's latency down.
	ReleaseTimings = kbwire.ReleaseTimings
	// AdoptRequest asks for a guest's first residency.
	AdoptRequest = kbwire.AdoptRequest
	// AdoptResponse carries MDK_1, sealed to the agent (seal role "adopt").
	AdoptResponse = kbwire.AdoptResponse
	// ReissueRequest asks again for the current epoch's MDK, for an agent that restarted.
	ReissueRequest = kbwire.ReissueRequest
	// ReissueResponse carries the current epoch's MDK sealed to the agent.
	ReissueResponse = kbwire.ReissueResponse
	// Ending is how a migration ends.
	Ending = kbwire.Ending
	// DestroyRequest ends a migration and asks for its receipt.
	DestroyRequest = kbwire.DestroyRequest
	// DestroyResponse carries the signed receipt.
	DestroyResponse = kbwire.DestroyResponse
	// ReceiptRequest asks for a migration's signed receipt.
	ReceiptRequest = kbwire.ReceiptRequest
	// ReceiptResponse carries a signed receipt.
	ReceiptResponse = kbwire.ReceiptResponse
	// PublicKeyResponse carries the receipt-signing public key, PEM, for tenants to pin.
	PublicKeyResponse = kbwire.PublicKeyResponse
	// RegisterTenantRequest registers a tenant's policy-signing key. It is an admin call.
	RegisterTenantRequest = kbwire.RegisterTenantRequest
	// RegisterTenantResponse confirms a registration.
	RegisterTenantResponse = kbwire.RegisterTenantResponse
)

// The endings of a migration.
const (
	// Commit: the destination runs the guest; the source's keys go.
	Commit = kbwire.Commit
	// Abort: the guest runs on at the source; the destination's keys go.
	Abort = kbwire.Abort
)

// ErrorCode maps an error of the keybroker's API to its stable wire code (WireCode), as a
// string for metrics. Details stay in the keybroker's log; the code is all an untrusted caller
// learns.
func ErrorCode(err error) string { return string(WireCode(err)) }

// WireCode maps an error of the keybroker's API to its wire code, one of package kbwire's: ""
// for nil, kbwire.CodeInternal for an error that matches none of the keybroker's sentinels.
func WireCode(err error) wireerr.Code {
	if err == nil {
		return ""
	}
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return kbwire.CodeInternal
}

// codes pairs the keybroker's sentinels with their wire codes, the first match winning.
var codes = []struct {
	err  error
	code wireerr.Code
}{
	{ErrUnauthorized, kbwire.CodeUnauthorized},
	{ErrInvalidRequest, kbwire.CodeInvalidRequest},
	{ErrNonceUnknown, kbwire.CodeNonceUnknown},
	{ErrNonceExpired, kbwire.CodeNonceExpired},
	{ErrNonceUsed, kbwire.CodeNonceUsed},
	{ErrNonceStoreFull, kbwire.CodeBusy},
	{ErrEvidenceRejected, kbwire.CodeEvidenceRejected},
	{ErrPolicyRejected, kbwire.CodePolicyRejected},
	{ErrDenied, kbwire.CodeDenied},
	{ErrUnknownTenant, kbwire.CodeUnknownTenant},
	{ErrNotAdopted, kbwire.CodeNotAdopted},
	{ErrAlreadyAdopted, kbwire.CodeAlreadyAdopted},
	{ErrGuestBusy, kbwire.CodeGuestBusy},
	{ErrUnknownMigration, kbwire.CodeUnknownMigration},
	{ErrBothEpochs, kbwire.CodeBothEpochs},
	{ErrErasureRejected, kbwire.CodeErasureRejected},
	{ErrUnproven, kbwire.CodeUnproven},
	{ErrUnsafeKey, kbwire.CodeUnsafeKey},
	{ErrDestructionPending, kbwire.CodeDestructionPending},
	{ErrVaultUnavailable, kbwire.CodeUnavailable},
}
