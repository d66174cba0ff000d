// Package natsapi offers the keybroker's API over NATS: a micro service "lethe-keybroker" in a
// queue group, so that several keybrokers serve one set of subjects, and a client of its
// admin and tenant-facing operations (lethectl). It is the keybroker's only NATS code: package
// keybroker imports no NATS and stays usable without it.
//
// Every operation is one request-reply on lethe.v1.keybroker.<op> with the JSON of package
// kbwire (package keybroker's request and response types). Errors travel as NATS micro error
// headers: the code is keybroker.ErrorCode's, the description the error's text for codes that
// concern the request (a denial names the failing policy rules) and a fixed text for
// unavailable and internal errors, whose details stay in the keybroker's log.
//
// The edge must never answer with or log a plaintext key, a Vault token or the admin token.
// Caveat: tenant.register carries the admin token inside the request; NATS is not trusted for
// secrecy, so run it over TLS, and give the admin's NATS user alone the right to publish on
// that subject.
package natsapi

import (
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// SubjectPrefix is the prefix of the keybroker API's subjects.
const SubjectPrefix = kbwire.SubjectPrefix

// The operations of the keybroker API: subject SubjectPrefix + "." + op. Package kbwire says
// which request and response each carries.
const (
	OpNonce          = kbwire.OpNonce
	OpRelease        = kbwire.OpRelease
	OpAdopt          = kbwire.OpAdopt
	OpReissue        = kbwire.OpReissue
	OpDestroy        = kbwire.OpDestroy
	OpReceipt        = kbwire.OpReceipt
	OpPublicKey      = kbwire.OpPublicKey
	OpTenantRegister = kbwire.OpTenantRegister
)

// Ops are the operations the service offers.
var Ops = []string{OpNonce, OpRelease, OpAdopt, OpReissue, OpDestroy, OpReceipt, OpPublicKey, OpTenantRegister}

// Subject returns the subject of op.
func Subject(op string) string { return SubjectPrefix + "." + op }

// TenantRegisterRequest is the admin call that registers a tenant: the registration and the
// keybroker's admin token.
type TenantRegisterRequest struct {
	AdminToken string `json:"adminToken"`
	keybroker.RegisterTenantRequest
}

// Wire error codes beyond keybroker.ErrorCode's, for requests the edge itself refuses.
const (
	// CodeInvalidRequest is keybroker.ErrorCode(keybroker.ErrInvalidRequest): a request that
	// does not decode or is too large.
	CodeInvalidRequest = "invalid_request"
	// CodeBusy is keybroker.ErrorCode(keybroker.ErrNonceStoreFull): the service is at its
	// concurrency limit or shutting down.
	CodeBusy = "busy"
)
