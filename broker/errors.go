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
	// ErrDenied: the keybroker denied a release or adoption.
	ErrDenied = errors.New("denied")
	// ErrUnavailable: a component the request needs did not answer.
	ErrUnavailable = errors.New("unavailable")
)

var codeOf = []struct {
	err  error
	code wireerr.Code
}{
	{ErrInvalid, CodeInvalid},
	{ErrNotFound, CodeNotFound},
	{ErrConflict, CodeConflict},
	{ErrFailedPrecondition, CodeFailedPrecondition},
	{ErrDenied, CodeDenied},
	{ErrUnavailable, CodeUnavailable},
}

// publicError is the broker API's error mapping (natsrpc.Config.Public): an error matching a
// sentinel is answered with its code and its text; any other is internal (nil), so that
// internals do not leak to callers. Only the broker's own sentinels count: an error answer of
// an agent or the keybroker that the broker wraps carries another API's code, never answered
// as such.
func publicError(err error) *wireerr.Error {
	for _, c := range codeOf {
		if errors.Is(err, c.err) {
			return wireerr.New(c.code, err.Error())
		}
	}
	return nil
}

// sentinelError is an error answer of the broker API as a Client returns it: it matches the
// wire error (and so its code) and the broker's sentinel of that code.
type sentinelError struct {
	wire     *wireerr.Error
	sentinel error
}

func (e *sentinelError) Error() string   { return e.wire.Error() }
func (e *sentinelError) Unwrap() []error { return []error{e.wire, e.sentinel} }

// withSentinel returns err with the broker sentinel of its code attached, when it is an error
// answer of the broker API with one of the broker's codes.
func withSentinel(err error) error {
	w, ok := errors.AsType[*wireerr.Error](err)
	if !ok {
		return err
	}
	for _, c := range codeOf {
		if c.code == w.Code {
			return &sentinelError{wire: w, sentinel: c.err}
		}
	}
	return err
}
