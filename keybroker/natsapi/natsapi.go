// Package natsapi offers the keybroker's API over NATS: a micro service "lethe-keybroker" in a
// queue group, so that several keybrokers serve one set of subjects, and a client of its
// admin and tenant-facing operations (package kbclient's, whose errors match the keybroker's
// sentinels; lethectl uses kbclient itself), and the publisher of the keybroker's audit events
// on the audit stream (AuditPublisher). With kbclient, it is the keybroker's only NATS code:
// package keybroker imports no NATS and stays usable without it.
//
// Every operation is one request-reply on lethe.v1.keybroker.<op> with the JSON of package
// kbwire, served through package natsrpc (admission limit, per-request deadline, drain, reply
// confinement). Errors travel as natsrpc's error answers: the code is one of kbwire's
// (keybroker.WireCode), the message the error's text for codes that concern the request (a
// denial names the failing policy rules) and a fixed text for unavailable and internal errors,
// whose details stay in the keybroker's log. Requests beyond the concurrency limit, or that
// arrive while the service stops, are answered kbwire.CodeBusy.
//
// The edge must never answer with or log a plaintext key or a Vault token. No bearer secret
// crosses NATS: tenant.register carries a statement signed with the operator's admin key
// (short-lived, used once), tenant.rotate-key one signed by the tenant's current or recovery
// key, guest.forget one signed by the guest's tenant or the admin (short-lived, used once; the
// broker carries it), and policy.publish a policy signed by the tenant; the keybroker verifies
// each.
package natsapi

import "github.com/lethe-cc/lethe/keybroker/kbwire"

// SubjectPrefix is the prefix of the keybroker API's subjects.
const SubjectPrefix = kbwire.SubjectPrefix

// The operations of the keybroker API: subject SubjectPrefix + "." + op. Package kbwire says
// which request and response each carries.
const (
	OpNonce           = kbwire.OpNonce
	OpRelease         = kbwire.OpRelease
	OpAdopt           = kbwire.OpAdopt
	OpReissue         = kbwire.OpReissue
	OpDestroy         = kbwire.OpDestroy
	OpReceipt         = kbwire.OpReceipt
	OpPublicKey       = kbwire.OpPublicKey
	OpTenantRegister  = kbwire.OpTenantRegister
	OpTenantRotateKey = kbwire.OpTenantRotateKey
	OpGuestForget     = kbwire.OpGuestForget
	OpPolicyPublish   = kbwire.OpPolicyPublish
	OpLogCheckpoint   = kbwire.OpLogCheckpoint
	OpLogConsistency  = kbwire.OpLogConsistency
	OpLogHistory      = kbwire.OpLogHistory
	OpLogCosign       = kbwire.OpLogCosign
	OpLogEntries      = kbwire.OpLogEntries
)

// Ops are the operations the service offers.
var Ops = []string{OpNonce, OpRelease, OpAdopt, OpReissue, OpDestroy, OpReceipt, OpPublicKey, OpTenantRegister, OpTenantRotateKey, OpGuestForget, OpPolicyPublish, OpLogCheckpoint, OpLogConsistency, OpLogHistory, OpLogCosign, OpLogEntries}

// Subject returns the subject of op.
func Subject(op string) string { return SubjectPrefix + "." + op }
