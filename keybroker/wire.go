package keybroker

import (
	"errors"

	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
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
