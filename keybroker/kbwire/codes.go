package kbwire

import "github.com/lethe-cc/lethe/internal/wireerr"

// The keybroker API's error codes. An error answer of the keybroker decodes (package natsrpc)
// as a *wireerr.Error that matches its code with errors.Is: errors.Is(err, kbwire.CodeDenied).
const (
	// CodeUnauthorized: an admin or tenant statement whose signature or freshness fails.
	CodeUnauthorized wireerr.Code = "unauthorized"
	// CodeInvalidRequest: a request that does not decode, is too large or is malformed.
	CodeInvalidRequest wireerr.Code = "invalid_request"
	// CodeNonceUnknown, CodeNonceExpired, CodeNonceUsed: the evidence's nonce is not one the
	// keybroker issued for it, has expired, or was used already.
	CodeNonceUnknown wireerr.Code = "nonce_unknown"
	CodeNonceExpired wireerr.Code = "nonce_expired"
	CodeNonceUsed    wireerr.Code = "nonce_used"
	// CodeBusy: the keybroker is at a limit (nonces outstanding, concurrent requests) or
	// shutting down; try again.
	CodeBusy wireerr.Code = "busy"
	// CodeEvidenceRejected: evidence that does not verify.
	CodeEvidenceRejected wireerr.Code = "evidence_rejected"
	// CodePolicyRejected: a policy whose signature fails or that rolls back a floor.
	CodePolicyRejected wireerr.Code = "policy_rejected"
	// CodeDenied: the tenant's policy denies the release; the message names the failing rules.
	CodeDenied wireerr.Code = "denied"
	// CodeUnknownTenant: no such tenant is registered.
	CodeUnknownTenant wireerr.Code = "unknown_tenant"
	// CodeNotAdopted, CodeAlreadyAdopted: the guest is not, or already, adopted.
	CodeNotAdopted     wireerr.Code = "not_adopted"
	CodeAlreadyAdopted wireerr.Code = "already_adopted"
	// CodeGuestBusy: another migration of the guest is in progress, or its record changed
	// concurrently.
	CodeGuestBusy wireerr.Code = "guest_busy"
	// CodeUnknownMigration: no such migration.
	CodeUnknownMigration wireerr.Code = "unknown_migration"
	// CodeBothEpochs: the request would destroy both epochs of a guest (abort after commit,
	// commit after abort).
	CodeBothEpochs wireerr.Code = "both_epochs"
	// CodeErasureRejected: the source's erasure evidence fails the tenant's policy.
	CodeErasureRejected wireerr.Code = "erasure_rejected"
	// CodeUnproven: a commit without a valid commit acknowledgement.
	CodeUnproven wireerr.Code = "unproven"
	// CodeUnsafeKey: a Vault Transit key of a name Lethe uses that the keybroker did not create;
	// nothing is released under it.
	CodeUnsafeKey wireerr.Code = "unsafe_key"
	// CodeDestructionPending: Vault is unreachable; the destruction is journaled and retried,
	// and the receipt follows it.
	CodeDestructionPending wireerr.Code = "destruction_pending"
	// CodeUnavailable: the keybroker cannot reach Vault; nothing was released.
	CodeUnavailable wireerr.Code = "unavailable"
	// CodeInternal: any other failure; its details stay in the keybroker's log.
	CodeInternal = wireerr.CodeInternal
)
