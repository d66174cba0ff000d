package broker

import (
	"errors"

	"github.com/lethe-cc/lethe/internal/wireerr"
)

// Error codes of the broker API. A Client's error answer matches both its code and the
// sentinel of the code (CodeNotFound and ErrNotFound) with errors.Is.
const (
	CodeInvalid            wireerr.Code = "invalid"
	CodeNotFound           wireerr.Code = "not_found"
	CodeConflict           wireerr.Code = "conflict"
	CodeFailedPrecondition wireerr.Code = "failed_precondition"
	CodeDenied             wireerr.Code = "denied"
	CodeUnavailable        wireerr.Code = "unavailable"
	CodeInternal                        = wireerr.CodeInternal
)

// Sentinel errors of the broker, its API and its keybroker client. A Client's error answers
// match these with errors.Is.
var (
	// ErrInvalid: a request is malformed.
	ErrInvalid = errors.New("invalid request")
	// ErrNotFound: no such guest, host, migration, policy or receipt visible to the caller.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the request races another (the guest is already migrating or adopted, the
	// migration is past the point of abort).
	ErrConflict = errors.New("conflict")
	// ErrFailedPrecondition: the system is not in a state that allows the request (no policy,
	// source host not live, destination incompatible).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrDenied: the keybroker denied a release or adoption, or refused a forget's statement.
	ErrDenied = errors.New("denied")
	// ErrUnavailable: a component the request needs did not answer.
	ErrUnavailable = errors.New("unavailable")
)

// codes pairs the broker API's sentinels with their codes. The API answers with it
// (codes.Public): an error matching a sentinel with its code and text, any other as internal,
// so that internals do not leak to callers. Only the broker's own sentinels count: an error
// answer of an agent or the keybroker that the broker wraps carries another API's code, never
// answered as such. A Client returns error answers that match both the code and the sentinel
// (codes.Sentinel).
var codes = wireerr.Table{
	{Err: ErrInvalid, Code: CodeInvalid},
	{Err: ErrNotFound, Code: CodeNotFound},
	{Err: ErrConflict, Code: CodeConflict},
	{Err: ErrFailedPrecondition, Code: CodeFailedPrecondition},
	{Err: ErrDenied, Code: CodeDenied},
	{Err: ErrUnavailable, Code: CodeUnavailable},
}

// withSentinel returns err with the broker sentinel of its code attached, when it is an error
// answer of the broker API with one of the broker's codes.
func withSentinel(err error) error { return codes.Sentinel(err, "") }

// publicError is the broker API's answer to err (natsrpc.Config.Public): codes.Public, and
// for an error no sentinel marks that says JetStream could not answer (a store call not
// wrapped by storeError), unavailable with its cause rather than internal, so that a caller
// can tell a cluster without quorum from a bug and try again.
func publicError(err error) *wireerr.Error {
	if e := codes.Public(err); e != nil {
		return e
	}
	if storeUnavailable(err) {
		return wireerr.New(CodeUnavailable, err.Error())
	}
	return nil
}
