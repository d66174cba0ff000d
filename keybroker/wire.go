package keybroker

import (
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
	if code, ok := codes.Code(err); ok {
		return code
	}
	return kbwire.CodeInternal
}

// codes pairs the keybroker's sentinels with their wire codes, the first match winning.
var codes = wireerr.Table{
	{Err: ErrUnauthorized, Code: kbwire.CodeUnauthorized},
	{Err: ErrInvalidRequest, Code: kbwire.CodeInvalidRequest},
	{Err: ErrNonceUnknown, Code: kbwire.CodeNonceUnknown},
	{Err: ErrNonceExpired, Code: kbwire.CodeNonceExpired},
	{Err: ErrNonceUsed, Code: kbwire.CodeNonceUsed},
	{Err: ErrNonceStoreFull, Code: kbwire.CodeBusy},
	{Err: ErrEvidenceRejected, Code: kbwire.CodeEvidenceRejected},
	{Err: ErrPolicyRejected, Code: kbwire.CodePolicyRejected},
	{Err: ErrDenied, Code: kbwire.CodeDenied},
	{Err: ErrUnknownTenant, Code: kbwire.CodeUnknownTenant},
	{Err: ErrNotAdopted, Code: kbwire.CodeNotAdopted},
	{Err: ErrAlreadyAdopted, Code: kbwire.CodeAlreadyAdopted},
	{Err: ErrGuestBusy, Code: kbwire.CodeGuestBusy},
	{Err: ErrUnknownMigration, Code: kbwire.CodeUnknownMigration},
	{Err: ErrBothEpochs, Code: kbwire.CodeBothEpochs},
	{Err: ErrErasureRejected, Code: kbwire.CodeErasureRejected},
	{Err: ErrUnproven, Code: kbwire.CodeUnproven},
	{Err: ErrUnsafeKey, Code: kbwire.CodeUnsafeKey},
	{Err: ErrDestructionPending, Code: kbwire.CodeDestructionPending},
	{Err: ErrVaultUnavailable, Code: kbwire.CodeUnavailable},
}
