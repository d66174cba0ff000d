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

import "errors"

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

// Table pairs an API's sentinel errors with their wire codes: the one mapping between the
// errors its handlers return and the codes its callers match, in both directions.
type Table []struct {
	Err  error
	Code Code
}

// Public is the server side (natsrpc.Config.Public): an error matching one of t's sentinels is
// answered with its code and its text; any other is internal (nil), its text kept out of the
// answer. Only t's own sentinels count, so that an error answer of another API that a handler
// wraps is never answered under that API's code.
func (t Table) Public(err error) *Error {
	if code, ok := t.Code(err); ok {
		return New(code, err.Error())
	}
	return nil
}

// Code returns the code of the first of t's sentinels that err matches, and false if it
// matches none.
func (t Table) Code(err error) (Code, bool) {
	for _, c := range t {
		if errors.Is(err, c.Err) {
			return c.Code, true
		}
	}
	return "", false
}

// Sentinel is the client side: err, when it is an error answer with one of t's codes, returned
// so that it also matches that code's sentinel (errors.Is(err, ErrNotFound)) besides its code;
// any other err unchanged. prefix starts the error's text ("" for none).
func (t Table) Sentinel(err error, prefix string) error {
	w, ok := errors.AsType[*Error](err)
	if !ok {
		return err
	}
	for _, c := range t {
		if c.Code == w.Code {
			return &sentinelError{wire: w, sentinel: c.Err, prefix: prefix}
		}
	}
	return err
}

// sentinelError is an error answer that matches its wire error (and so its code) and its
// API's sentinel of that code.
type sentinelError struct {
	wire     *Error
	sentinel error
	prefix   string
}

func (e *sentinelError) Error() string   { return e.prefix + e.wire.Error() }
func (e *sentinelError) Unwrap() []error { return []error{e.wire, e.sentinel} }
