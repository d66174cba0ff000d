package kbwire

import (
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// SubjectPrefix is the prefix of the keybroker API's subjects: an operation op is served on
// SubjectPrefix + "." + op.
const SubjectPrefix = natsauth.KeybrokerSubjectPrefix

// The operations of the keybroker API.
const (
	// OpNonce: NonceRequest → NonceResponse.
	OpNonce = "nonce"
	// OpRelease: ReleaseRequest → ReleaseResponse.
	OpRelease = "release"
	// OpAdopt: AdoptRequest → AdoptResponse.
	OpAdopt = "adopt"
	// OpReissue: ReissueRequest → ReissueResponse.
	OpReissue = "reissue"
	// OpDestroy: DestroyRequest → DestroyResponse.
	OpDestroy = "destroy"
	// OpReceipt: ReceiptRequest → ReceiptResponse.
	OpReceipt = "receipt"
	// OpPublicKey: no request body → PublicKeyResponse. Tenants and operators may call it.
	OpPublicKey = "pubkey"
	// OpTenantRegister: AdminRequest (an AdminStatement signed with the admin key, whose
	// Request is a RegisterTenantRequest) → RegisterTenantResponse.
	OpTenantRegister = "tenant.register"
	// OpTenantRotateKey: RotateKeyRequest (a KeyRotation signed by the tenant's current key or
	// its recovery key) → RotateKeyResponse. Tenants call it.
	OpTenantRotateKey = "tenant.rotate-key"
	// OpGuestForget: ForgetRequest (an AdminStatement signed with the admin key, or a
	// TenantStatement signed with the guest's tenant's policy key, whose Request is a
	// ForgetGuestRequest) → ForgetResponse: the guest's live key is destroyed and it may be
	// adopted again. The broker calls it (guests.forget), passing on the caller's statement.
	OpGuestForget = "guest.forget"
	// OpPolicyPublish: PublishPolicyRequest (a policy envelope signed by the tenant) →
	// PublishPolicyResponse: raises the floor of the policy's (tenant, name). Tenants call it.
	OpPolicyPublish = "policy.publish"
	// OpLogCheckpoint: LogCheckpointRequest → LogCheckpointResponse: a signed checkpoint of the
	// residency log. Anyone with a keybroker role may call it (tenants, operators, witnesses).
	OpLogCheckpoint = "log.checkpoint"
	// OpLogConsistency: LogConsistencyRequest → LogConsistencyResponse.
	OpLogConsistency = "log.consistency"
	// OpLogHistory: LogHistoryRequest → tlog.History: a guest's entries with inclusion proofs.
	// A tenant is answered only about its own guests.
	OpLogHistory = "log.history"
	// OpLogCosign: LogCosignRequest (a checkpoint cosigned by a witness) →
	// LogCheckpointResponse (the checkpoint with every cosignature it has).
	OpLogCosign = "log.cosign"
	// OpLogEntries: LogEntriesRequest → LogEntriesResponse: the log's leaves, for a monitor.
	// Operators (and the broker) only: the leaves name every tenant's guests.
	OpLogEntries = "log.entries"
)

// The keybroker's requests and responses. They encode as JSON (byte strings base64, as
// encoding/json does), so that an edge (NATS, a CLI) can carry them unchanged.

// Host describes the host an agent runs on, as the provider registered it.
type Host struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
	Region string            `json:"region,omitempty"`
}

// NonceRequest asks for a nonce for one role of a migration (or adoption).
type NonceRequest struct {
	MigrationID string      `json:"migrationId"`
	Role        attest.Role `json:"role"`
}

// NonceResponse carries a fresh nonce and when it expires.
type NonceResponse struct {
	Nonce   []byte    `json:"nonce"`
	Expires time.Time `json:"expires"`
}

// Attestation is one agent's evidence and the nonce it was made for.
type Attestation struct {
	Nonce    []byte           `json:"nonce"`
	Evidence *attest.Evidence `json:"evidence"`
}

// ReleaseRequest asks for the keys of a migration.
type ReleaseRequest struct {
	MigrationID string `json:"migrationId"`
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	// Policy is the tenant's signed policy envelope, exactly as the tenant signed it.
	Policy          []byte      `json:"policy"`
	Source          Attestation `json:"source"`
	Destination     Attestation `json:"destination"`
	DestinationHost Host        `json:"destinationHost"`
	// SourceHost is the host the source agent runs on; the grant names it.
	SourceHost string `json:"sourceHost"`
}

// ReleaseResponse carries the keys of a migration, sealed to each agent.
type ReleaseResponse struct {
	MigrationID string `json:"migrationId"`
	// FromEpoch is the guest's epoch at the source; ToEpoch the one the destination starts.
	FromEpoch uint64 `json:"fromEpoch"`
	ToEpoch   uint64 `json:"toEpoch"`
	// SealedSource holds TK for the source agent (seal role "source").
	SealedSource []byte `json:"sealedSource"`
	// SealedDestination holds TK and MDK_{ToEpoch} for the destination (role "destination").
	SealedDestination []byte `json:"sealedDestination"`
	// WrappedMDK is MDK_{ToEpoch} wrapped by Vault under the epoch key, for the migration
	// record; only the keybroker can unwrap it, and only while the epoch key lives.
	WrappedMDK   string          `json:"wrappedMdk"`
	PolicyDigest attest.HexBytes `json:"policyDigest"`
	PolicySVN    uint64          `json:"policySvn"`
	// ZeroPageElision says whether the tenant's policy lets the source skip zero pages
	// (spec.transport.allowZeroPageElision); the broker passes it on to the transfer.
	ZeroPageElision bool `json:"zeroPageElision"`
	// MaxDowntime is the tenant's downtime limit (spec.transport.maxDowntime), zero for none;
	// the broker lowers its own limit to it, never raises it.
	MaxDowntime time.Duration `json:"maxDowntime,omitempty"`
	// Grant is the keybroker's signed statement of this release (package grant's DSSE
	// envelope): both agents get it with their sealed keys and refuse keys without it.
	Grant []byte `json:"grant"`
	// DataEndpoint is the destination's data endpoint as its attested statement names it.
	DataEndpoint string `json:"dataEndpoint"`

	// Timings are how long the phases of the release took, for the keybroker's metrics. They
	// do not travel: a decoded response has none.
	Timings ReleaseTimings `json:"-"`
}

// ReleaseTimings break a release's latency down.
type ReleaseTimings struct {
	// Verify is the wall time of verifying both pieces of evidence (in parallel, beside the
	// reads of the tenant and guest records).
	Verify time.Duration
	// Evaluate is the policy's verification and evaluation.
	Evaluate time.Duration
	// Vault is the wall time of the Vault calls after evaluation.
	Vault time.Duration
	// Seal is the HPKE sealing of both key sets.
	Seal time.Duration
	// Log is the append of the release's entry to the residency log (after the grant is
	// signed, beside the record of the release in Vault).
	Log time.Duration
}

// AdoptRequest asks for a guest's first residency.
type AdoptRequest struct {
	// AdoptionID names the adoption as a migration ID names a migration (nonce, seal info).
	AdoptionID string `json:"adoptionId"`
	Tenant     string `json:"tenant"`
	VM         string `json:"vm"`
	Policy     []byte `json:"policy"`
	// Agent is the evidence of the agent of the host where the guest starts (role "adopt").
	Agent Attestation `json:"agent"`
	Host  Host        `json:"host"`
}

// AdoptResponse carries MDK_1, sealed to the agent (seal role "adopt").
type AdoptResponse struct {
	Epoch        uint64          `json:"epoch"`
	Sealed       []byte          `json:"sealed"`
	WrappedMDK   string          `json:"wrappedMdk"`
	PolicyDigest attest.HexBytes `json:"policyDigest"`
	PolicySVN    uint64          `json:"policySvn"`
	// Grant is the keybroker's signed statement of the adoption (package grant).
	Grant []byte `json:"grant"`
}

// ReissueRequest asks again for the current epoch's MDK, for an agent that restarted.
type ReissueRequest struct {
	// ReissueID names the request as a migration ID names a migration (nonce, seal info).
	ReissueID string `json:"reissueId"`
	Tenant    string `json:"tenant"`
	VM        string `json:"vm"`
	Policy    []byte `json:"policy"`
	// Agent is the restarted agent's fresh evidence (role "adopt").
	Agent Attestation `json:"agent"`
	Host  Host        `json:"host"`
}

// ReissueResponse carries the current epoch's MDK sealed to the agent (seal role "adopt").
type ReissueResponse struct {
	Epoch        uint64          `json:"epoch"`
	Sealed       []byte          `json:"sealed"`
	PolicyDigest attest.HexBytes `json:"policyDigest"`
	PolicySVN    uint64          `json:"policySvn"`
	// Grant is the keybroker's signed statement of the reissue (package grant).
	Grant []byte `json:"grant"`
}

// Ending is how a migration ends.
type Ending string

// The endings of a migration.
const (
	// Commit: the destination runs the guest; the source's keys go (the migration key and
	// epoch e).
	Commit Ending = "commit"
	// Abort: the guest runs on at the source; the destination's keys go (the migration key and
	// epoch e+1).
	Abort Ending = "abort"
)

// DestroyRequest ends a migration and asks for its receipt.
type DestroyRequest struct {
	MigrationID string `json:"migrationId"`
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	Ending      Ending `json:"ending"`
	// Erasure is the source's final evidence (role "erased", with its erasure statement);
	// commit only. A commit without it, or with evidence the tenant's policy does not accept,
	// is refused unless UnverifiedErasure is set.
	Erasure *Attestation `json:"erasure,omitempty"`
	// CommitAck is the destination's commit acknowledgement (package grant's CommitAck, MACed
	// under a key derived from TK), as the source received it; required for a commit. The
	// keybroker unwraps TK and verifies the MAC before it touches the source's epoch key.
	CommitAck []byte `json:"commitAck,omitempty"`
	// UnverifiedErasure asks to commit without proof of the source's erasure (the source host
	// is lost for good): the receipt then says committed-unverified-erasure, never erased.
	// Commit only; the commit acknowledgement is still required.
	UnverifiedErasure bool `json:"unverifiedErasure,omitempty"`
}

// DestroyResponse carries the signed receipt. A reader that only stores or forwards the
// receipt may decode it as raw JSON instead (package broker's DestroyResponse does).
type DestroyResponse struct {
	Receipt *receipt.Envelope `json:"receipt"`
	// Log proves that the ending's entry, which names the receipt, is in the residency log.
	Log *tlog.Inclusion `json:"log,omitempty"`
}

// ReceiptRequest asks for a migration's signed receipt.
type ReceiptRequest struct {
	MigrationID string `json:"migrationId"`
	// Wait waits (AwaitReceipt, bounded by the server) while the migration's destruction is
	// pending instead of answering destruction_pending at once.
	Wait bool `json:"wait,omitempty"`
}

// ReceiptResponse carries a signed receipt.
type ReceiptResponse struct {
	Receipt *receipt.Envelope `json:"receipt"`
	// Log proves that the ending's entry, which names the receipt, is in the residency log.
	Log *tlog.Inclusion `json:"log,omitempty"`
}

// PublicKeyResponse carries the receipt-signing public key, PEM, for tenants to pin.
type PublicKeyResponse struct {
	PEM string `json:"pem"`
	// LogOrigin is the residency log's name in its checkpoints, verified with this key.
	LogOrigin string `json:"logOrigin,omitempty"`
}

// RegisterTenantRequest registers a tenant's policy-signing key. It is an admin call: it travels
// as the Request of a signed AdminStatement. It never re-keys a registered tenant (see
// KeyRotation).
type RegisterTenantRequest struct {
	Tenant string `json:"tenant"`
	// PolicyKey is the tenant's Ed25519 public key (32 bytes).
	PolicyKey []byte `json:"policyKey"`
	// RecoveryKey is an optional second Ed25519 public key (32 bytes), kept offline by the
	// tenant: a KeyRotation signed by it replaces a lost policy key.
	RecoveryKey []byte `json:"recoveryKey,omitempty"`
}

// RegisterTenantResponse confirms a registration.
type RegisterTenantResponse struct {
	Tenant string `json:"tenant"`
	// PolicySVN is the tenant-wide floor of records written before floors were kept per
	// policy name; 0 for a tenant registered since.
	PolicySVN uint64 `json:"policySvn"`
	// KeyID names the registered policy key (dsse.KeyID).
	KeyID string `json:"keyId,omitempty"`
	// Recovery says whether a recovery key is registered.
	Recovery bool `json:"recovery,omitempty"`
}

// AdminRequest is an admin call: Signed is a DSSE envelope (payload type AdminPayloadType) of
// an AdminStatement, signed with the admin key whose public key the keybroker pins.
type AdminRequest struct {
	Signed []byte `json:"signed"`
}

// ForgetGuestRequest asks the keybroker to forget a guest whose VM is gone for good. It
// travels as the Request of a signed AdminStatement or TenantStatement for OpGuestForget, so
// that the broker, which carries it, cannot make it up nor change it.
type ForgetGuestRequest struct {
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	// Reason is why (audited).
	Reason string `json:"reason,omitempty"`
}

// ForgetRequest is the call OpGuestForget: Tenant and VM name the guest, and Signed is the
// statement that asks for it (a DSSE envelope of an AdminStatement, payload type
// AdminPayloadType, or of a TenantStatement, TenantPayloadType), whose ForgetGuestRequest
// must name the same guest.
type ForgetRequest struct {
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	Signed []byte `json:"signed"`
}

// ForgetResponse says what a forget destroyed.
type ForgetResponse struct {
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	// ForgetID names the forget (its log entry's migrationId).
	ForgetID string `json:"forgetId"`
	// Epoch is the epoch that was live; DestroyedKeys its key.
	Epoch         uint64   `json:"epoch"`
	DestroyedKeys []string `json:"destroyedKeys"`
	// By is who signed the statement: "admin" or "tenant".
	By string `json:"by"`
}

// RotateKeyRequest replaces a tenant's policy key: Signed is a DSSE envelope (payload type
// RotationPayloadType) of a KeyRotation, signed by the tenant's current policy key or by its
// recovery key.
type RotateKeyRequest struct {
	Signed []byte `json:"signed"`
}

// RotateKeyResponse confirms a rotation.
type RotateKeyResponse struct {
	Tenant string `json:"tenant"`
	// KeyID names the new policy key.
	KeyID string `json:"keyId"`
	// Recovery says whether the rotation was signed by the recovery key.
	Recovery bool `json:"recovery,omitempty"`
}

// PublishPolicyRequest publishes a tenant's signed policy to the keybroker, which raises the
// floor of the policy's (tenant, name) to its policySvn.
type PublishPolicyRequest struct {
	// Policy is the signed policy envelope, exactly as the tenant signed it.
	Policy []byte `json:"policy"`
}

// PublishPolicyResponse says the floor of (Tenant, Name) after the publication.
type PublishPolicyResponse struct {
	Tenant string `json:"tenant"`
	Name   string `json:"name"`
	// Floor is the lowest policySvn the keybroker now accepts for (Tenant, Name).
	Floor uint64 `json:"floor"`
}

// LogCheckpointRequest asks for a signed checkpoint of the residency log.
type LogCheckpointRequest struct {
	// Witnessed asks for the newest checkpoint a witness cosigned rather than the newest.
	Witnessed bool `json:"witnessed,omitempty"`
}

// LogCheckpointResponse carries a signed checkpoint (a C2SP signed note) with its witnesses'
// cosignatures.
type LogCheckpointResponse struct {
	Checkpoint []byte `json:"checkpoint"`
}

// LogConsistencyRequest asks for the proof that the log of From entries is a prefix of the log
// of To entries.
type LogConsistencyRequest struct {
	From uint64 `json:"from"`
	To   uint64 `json:"to"`
}

// LogConsistencyResponse carries a consistency proof (RFC 9162).
type LogConsistencyResponse struct {
	Proof [][]byte `json:"proof"`
}

// LogHistoryRequest asks for a guest's entries of the residency log, each with its inclusion
// proof against one checkpoint.
type LogHistoryRequest struct {
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	// Witnessed proves them against the newest checkpoint a witness cosigned (which may not
	// hold the newest entries yet).
	Witnessed bool `json:"witnessed,omitempty"`
	// Size proves them against the stored checkpoint of that size instead: the one of the
	// first page, when asking for the next.
	Size uint64 `json:"size,omitempty"`
	// FromSeq is the first entry wanted (its seq; 0 or 1: from the first). An answer holds
	// at most 200 entries; tlog.History.Next says where the next page starts.
	FromSeq uint64 `json:"fromSeq,omitempty"`
}

// LogCosignRequest carries a checkpoint the log signed, cosigned by a witness.
type LogCosignRequest struct {
	Checkpoint []byte `json:"checkpoint"`
}

// MaxLogEntries bounds the leaves of one LogEntriesResponse.
const MaxLogEntries = 256

// LogEntriesRequest asks for leaves [From, To) of the residency log (at most MaxLogEntries).
type LogEntriesRequest struct {
	From uint64 `json:"from"`
	To   uint64 `json:"to"`
}

// LogEntriesResponse carries leaves of the residency log, in order from the request's From.
type LogEntriesResponse struct {
	Leaves [][]byte `json:"leaves"`
}
