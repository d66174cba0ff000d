package broker

import (
	"errors"
	"fmt"
)

// Error codes of the broker API (NATS micro error codes).
const (
	CodeInvalid            = "invalid"
	CodeNotFound           = "not_found"
	CodeConflict           = "conflict"
	CodeFailedPrecondition = "failed_precondition"
	CodeDenied             = "denied"
	CodeUnavailable        = "unavailable"
	CodeInternal           = "internal"
)

// Sentinel errors of the broker, its API and its keybroker client. Errors decoded from the
// wire are *Error values that match these with errors.Is.
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
	code string
}{
	{ErrInvalid, CodeInvalid},
	{ErrNotFound, CodeNotFound},
	{ErrConflict, CodeConflict},
	{ErrFailedPrecondition, CodeFailedPrecondition},
	{ErrDenied, CodeDenied},
	{ErrUnavailable, CodeUnavailable},
}

// Error is an error received over NATS from the broker API or the keybroker API.
type Error struct {
	// Code is one of the Code* constants.
	Code string
	// Message is the server's description.
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// Is matches e against the sentinel of its code.
func (e *Error) Is(target error) bool {
	for _, c := range codeOf {
		if c.err == target {
			return c.code == e.Code
		}
	}
	return false
}

// wireError maps err to a wire code and description. Errors that match no sentinel are
// internal: their text is replaced, so internals do not leak to callers.
func wireError(err error) (code, description string, internal bool) {
	for _, c := range codeOf {
		if errors.Is(err, c.err) {
			return c.code, err.Error(), false
		}
	}
	return CodeInternal, "internal error", true
}
