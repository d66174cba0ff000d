// Package wireerr is the one error type of Lethe's NATS request/response APIs: a public code and
// a message, as a server answers them and a client decodes them.
//
// Each wire package declares its codes as Code constants (package kbwire the keybroker's,
// package agentapi the agent's, package broker the broker's). A Code is itself an error, so a
// caller matches a decoded error with errors.Is(err, kbwire.CodeDenied) and never by its text.
//
// It is a leaf: it imports nothing but the standard library, so that the wire packages the
// in-TEE agent links (kbwire, agentapi) can declare codes without linking NATS. It must never
// carry internal details: what goes into an Error goes to an untrusted caller.
package wireerr

// Code is a stable, public error code of a wire API. As an error, it is the sentinel of its
// code: an *Error matches it with errors.Is.
type Code string

// Error returns the code itself.
func (c Code) Error() string { return string(c) }

// CodeInternal is the code of every failure whose details a server keeps to itself.
const CodeInternal Code = "internal"

// Error is an error answered over the wire: a code and a message meant for the caller.
type Error struct {
	// Code is the public code, one the answering API declares.
	Code Code
	// Message describes the failure for the caller; it holds no internal detail.
	Message string
}

// New returns an error of code with message.
func New(code Code, message string) *Error { return &Error{Code: code, Message: message} }

func (e *Error) Error() string {
	if e.Message == "" {
		return string(e.Code)
	}
	return string(e.Code) + ": " + e.Message
}

// Is reports whether target is e's Code, or an *Error of the same code.
func (e *Error) Is(target error) bool {
	switch t := target.(type) {
	case Code:
		return t == e.Code
	case *Error:
		return t.Code == e.Code
	}
	return false
}
