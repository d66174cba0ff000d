package agentapi

import (
	"encoding/json"
	"errors"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/wireerr"
)

// MaxMessageSize bounds every request and reply of the agent API; evidence with its
// certificate chain is a few KiB, so anything this large is hostile.
const MaxMessageSize = 1 << 20

// AttestRequest asks an agent for evidence bound to a migration (role source) or to a
// guest's first residency (role adopt). The agent makes a fresh HPKE key pair for the
// migration and binds its public key into the evidence.
type AttestRequest struct {
	MigrationID string      `json:"migrationId"`
	Role        attest.Role `json:"role"`
	Nonce       []byte      `json:"nonce"`
	// Tenant and VM name the guest the evidence is for.
	Tenant string `json:"tenant,omitempty"`
	VM     string `json:"vm,omitempty"`
}

// PrepareRequest asks the destination agent to make ready to receive a guest: scrub and check
// its receive region, make an HPKE key pair, and attest (role destination) with its
// clean-memory statement.
type PrepareRequest struct {
	MigrationID string `json:"migrationId"`
	Nonce       []byte `json:"nonce"`
	Tenant      string `json:"tenant,omitempty"`
	VM          string `json:"vm"`
	MemoryBytes uint64 `json:"memoryBytes"`
}

// PrepareResponse is the destination's evidence (its statement is the clean-memory
// statement) and the host:port its data plane listens on for this migration.
type PrepareResponse struct {
	Evidence     *attest.Evidence `json:"evidence"`
	DataEndpoint string           `json:"dataEndpoint"`
	// Lanes is how many byte streams beyond the first (a libvirt migration's multifd
	// channels) the destination accepts for this migration: 0 for none, which is also what
	// an agent that predates lanes answers. The broker passes it on (TransferRequest.Lanes).
	Lanes int `json:"lanes,omitempty"`
}

// KeysRequest delivers the keys the keybroker sealed to the agent's HPKE key for a migration
// (or an adoption). Only the agent can open them.
type KeysRequest struct {
	MigrationID string      `json:"migrationId"`
	Role        attest.Role `json:"role"`
	SealedKeys  []byte      `json:"sealedKeys"`
	// Grant is the keybroker's signed statement of the release, adoption or reissue (package
	// grant's DSSE envelope). The agent refuses sealed keys without a grant signed by the
	// keybroker key it pins that names this migration, role, guest, host, HPKE key, nonce and
	// these very sealed keys.
	Grant []byte `json:"grant"`
}

// KeysResponse acknowledges that the agent opened its keys.
type KeysResponse struct {
	OK bool `json:"ok"`
}

// TransferRequest asks the source agent to start moving the guest to the destination's data
// endpoint. It returns at once; a repeated request for the same migration returns the current
// state and starts nothing. The agent sends only to the endpoint the keybroker's grant names:
// a DataEndpoint that differs from it is refused (empty means the grant's).
type TransferRequest struct {
	MigrationID  string `json:"migrationId"`
	Tenant       string `json:"tenant,omitempty"`
	VM           string `json:"vm,omitempty"`
	DataEndpoint string `json:"dataEndpoint"`
	// Streams is the number of parallel data-plane connections; 0 means the agent's default.
	Streams int `json:"streams,omitempty"`
	// ZeroPageElision allows sending zero pages as a flag (the tenant's policy decides).
	ZeroPageElision bool `json:"zeroPageElision"`
	// MaxDowntime is the longest the guest may be paused at cutover: the operator's limit,
	// lowered to the tenant's policy's. Pre-copy goes on until the dirty set fits it at the
	// measured throughput. Zero means the agent's own limit.
	MaxDowntime time.Duration `json:"maxDowntime,omitempty"`
	// Lanes is the destination's PrepareResponse.Lanes: a libvirt source carries at most
	// this many multifd channels, fewer than its own setting if the destination takes fewer
	// (one that predates lanes, or is set lower), so that agents of different settings or
	// versions still migrate, on one stream at worst. A broker that lies about it gains a
	// refused handshake or a slower stream, nothing more: the destination accepts only the
	// lanes it allows.
	Lanes int `json:"lanes,omitempty"`
}

// TransferPhase is where a transfer is.
type TransferPhase string

// The phases of a transfer, as the source reports them.
const (
	TransferStarted   TransferPhase = "started"
	TransferPrecopy   TransferPhase = "precopy"
	TransferCutover   TransferPhase = "cutover"
	TransferCommitted TransferPhase = "committed"
	TransferFailed    TransferPhase = "failed"
)

// Progress is the state of a transfer: the reply to transfer, and what the source publishes
// on its progress subject.
type Progress struct {
	MigrationID string        `json:"migrationId"`
	Phase       TransferPhase `json:"phase"`
	// Bytes and Pages sent so far; TotalBytes is the guest's memory size.
	Bytes      uint64 `json:"bytes"`
	Pages      uint64 `json:"pages"`
	TotalBytes uint64 `json:"totalBytes,omitempty"`
	// Round is the pre-copy round, from 1.
	Round int `json:"round"`
	// DirtyRate is the rate at which the guest dirties memory, in bytes per second.
	DirtyRate float64 `json:"dirtyRate"`
	// ETA is the agent's estimate of the time left to converge; meaningless (zero) while
	// NotConverging.
	ETA time.Duration `json:"eta"`
	// NotConverging says the guest dirties memory faster than pre-copy sends it, so that the
	// dirty set does not shrink towards the downtime limit: there is no ETA.
	NotConverging bool `json:"notConverging,omitempty"`
	// Throughput is the rate of the last round, in bytes per second.
	Throughput float64 `json:"throughput,omitempty"`
	// Throttle is the percentage by which auto-converge slowed the guest during the last
	// round; 0 (omitted) for none.
	Throttle int `json:"throttle,omitempty"`
	// Downtime is how long the guest was paused, from the pause before the final round to
	// the destination's commit acknowledgement, in phase committed. See DowntimeSource.
	Downtime time.Duration `json:"downtime,omitempty"`
	// DowntimeSource says who measured Downtime: DowntimeHypervisor (libvirt's job
	// statistics) or DowntimeAgent (the source agent's clock).
	DowntimeSource string `json:"downtimeSource,omitempty"`
	// Rounds summarises the pre-copy rounds, the final one last, in phase committed.
	Rounds []RoundStats `json:"rounds,omitempty"`
	// PostCopy says the (libvirt) source switched the migration to post-copy: the guest has
	// run at the destination since, while its last pages arrived.
	PostCopy bool `json:"postCopy,omitempty"`
	// CommitAck is the destination's commit acknowledgement (MACed with the transfer key), set
	// in phase committed.
	CommitAck []byte `json:"commitAck,omitempty"`
	// MemoryDigest is the guest's memory root at cutover, in phase committed (a hash over page
	// and chunk digests kept as pages move, docs/protocol.md): the source completes it while
	// the guest is paused after the final round, and the destination acknowledged only a
	// region with the same root. A destination's Status carries its own.
	MemoryDigest attest.HexBytes `json:"memoryDigest,omitempty"`
	// Error says why the transfer failed, in phase failed.
	Error string `json:"error,omitempty"`
	// Time is when the agent produced this report.
	Time time.Time `json:"time"`
}

// Who measured a Progress's Downtime.
const (
	// DowntimeHypervisor is the hypervisor's own measurement (libvirt's job statistics).
	DowntimeHypervisor = "hypervisor"
	// DowntimeAgent is the source agent's: from its pause of the guest to the end of the
	// data plane's run after the commit acknowledgement, an upper bound.
	DowntimeAgent = "agent"
)

// MaxRounds bounds Progress.Rounds; a transfer with more rounds reports its last ones.
const MaxRounds = 64

// RoundStats summarises one pre-copy round.
type RoundStats struct {
	// Round counts from 1.
	Round int `json:"round"`
	// Final marks the round sent while the guest was paused.
	Final bool `json:"final,omitempty"`
	// Pages and Bytes are what the round sent.
	Pages uint64 `json:"pages"`
	Bytes uint64 `json:"bytes"`
	// DirtyRate is how fast the guest dirtied memory during the round, bytes per second.
	DirtyRate float64 `json:"dirtyRate"`
	// Throughput is how fast the round sent, bytes per second.
	Throughput float64 `json:"throughput"`
	// Duration is how long the round took.
	Duration time.Duration `json:"duration"`
	// Throttle is the percentage by which auto-converge slowed the guest during the round; 0
	// (omitted) for none.
	Throttle int `json:"throttle,omitempty"`
}

// StatusRequest asks an agent for its view of a migration.
type StatusRequest struct {
	MigrationID string `json:"migrationId"`
}

// Status is an agent's view of a migration.
type Status struct {
	MigrationID string      `json:"migrationId"`
	Role        attest.Role `json:"role,omitempty"`
	// Known is false when the agent has never heard of the migration.
	Known bool `json:"known"`
	// KeysHeld reports whether the agent still holds keys of the migration.
	KeysHeld bool      `json:"keysHeld"`
	Transfer *Progress `json:"transfer,omitempty"`
	Erased   bool      `json:"erased"`
	Aborted  bool      `json:"aborted"`
}

// EraseRequest asks for evidence (role erased) carrying the agent's erasure statement: the
// source's after a commit (keys zeroized, the guest's pages and spool scrubbed), the
// destination's after an abort (keys zeroized, the receive region scrubbed, the guest never
// resumed), which the keybroker requires before it destroys that end's keys.
type EraseRequest struct {
	MigrationID string `json:"migrationId"`
	Nonce       []byte `json:"nonce"`
	// HPKEPublicKey is the HPKE public key the evidence binds: the one the keybroker released
	// to (the grant names it), which must be one this agent attested with for the migration.
	// Empty: the key of the grant the agent took, or else the last it attested with.
	HPKEPublicKey []byte `json:"hpkePublicKey,omitempty"`
}

// AbortRequest ends a migration before commit: the destination scrubs and zeroizes, the
// source zeroizes the transfer key and resumes the guest.
type AbortRequest struct {
	MigrationID string `json:"migrationId"`
	Reason      string `json:"reason,omitempty"`
	// Receipt is the keybroker's signed receipt of how the migration ended (the DSSE envelope,
	// as JSON). A source whose FIN went out without a commit acknowledgement cannot tell
	// whether the destination resumed the guest, and acts only on it: it resumes the guest for
	// an aborted receipt (the destination proved it erased and never resumed it), and drops
	// and scrubs its copy for a committed one. Without such a receipt it answers Unresolved.
	Receipt json.RawMessage `json:"receipt,omitempty"`
}

// AbortResponse is the agent's erasure statement for an abort. A source that has already
// received the commit acknowledgement refuses to abort: it answers Committed with the
// acknowledgement, and the broker completes the commit instead.
type AbortResponse struct {
	Statement json.RawMessage `json:"statement,omitempty"`
	// Resumed reports that the source resumed the guest.
	Resumed   bool   `json:"resumed,omitempty"`
	Committed bool   `json:"committed,omitempty"`
	CommitAck []byte `json:"commitAck,omitempty"`
	// MemoryDigest is the guest memory digest at cutover, with Committed (as the committed
	// progress report states it, which the broker may have missed).
	MemoryDigest attest.HexBytes `json:"memoryDigest,omitempty"`
	// Unresolved: the source sent its FIN but got no acknowledgement, so it keeps the guest
	// paused until the request carries the keybroker's receipt of how the migration ended.
	Unresolved bool `json:"unresolved,omitempty"`
}

// HostRecord is what an agent keeps in the lethe-hosts bucket under its host name.
type HostRecord struct {
	Host     string            `json:"host"`
	Platform attest.Platform   `json:"platform"`
	Labels   map[string]string `json:"labels,omitempty"`
	Region   string            `json:"region,omitempty"`
	// DataAddr is the address the agent's data plane listens on, host:port.
	DataAddr string `json:"dataAddr,omitempty"`
	// Guests are the guests running on the host.
	Guests []HostGuest `json:"guests,omitempty"`
	// MemoryBytes is the host's physical memory; AllocatableBytes what of it the agent may
	// give guests (its setting, by default all of MemoryBytes). Zero means not reported.
	MemoryBytes      uint64 `json:"memoryBytes,omitempty"`
	AllocatableBytes uint64 `json:"allocatableBytes,omitempty"`
	// MaxMigrations is how many migrations the agent holds in flight at once, as source or
	// destination; it refuses one beyond it. Brokers admit no more to the host. Zero means
	// not reported (an older agent): brokers then apply only their own limit.
	MaxMigrations int `json:"maxMigrations,omitempty"`
	// TCB is the TCB level the host's evidence reports, read by the agent from its own
	// evidence without verifying it: advice for placement, never a reason to release keys.
	// Nil means unknown.
	TCB *attest.HostTCB `json:"tcb,omitempty"`
	// Heartbeat is when the agent wrote this record.
	Heartbeat time.Time `json:"heartbeat"`
}

// HostGuest is a guest running on a host.
type HostGuest struct {
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	MemoryBytes uint64 `json:"memoryBytes"`
}

// CommittedBytes is the memory of the guests the host runs.
func (h *HostRecord) CommittedBytes() uint64 {
	var n uint64
	for _, g := range h.Guests {
		n += g.MemoryBytes
	}
	return n
}

// Guest returns the guest named by tenant and vm, or nil.
func (h *HostRecord) Guest(tenant, vm string) *HostGuest {
	for i := range h.Guests {
		if h.Guests[i].Tenant == tenant && h.Guests[i].VM == vm {
			return &h.Guests[i]
		}
	}
	return nil
}

// Error codes of the agent API. An agent's error answer is a *wireerr.Error that matches its
// code, and the Handler sentinel of the code (CodeNotFound and ErrNotFound), with errors.Is.
const (
	CodeBadRequest wireerr.Code = "bad_request"
	CodeNotFound   wireerr.Code = "not_found"
	CodeConflict   wireerr.Code = "conflict"
	// CodeBusy: the agent is at its limit of concurrent requests, or stopping; try again.
	CodeBusy     wireerr.Code = "busy"
	CodeInternal              = wireerr.CodeInternal
)

// Errors a Handler returns to choose the wire code of its failure; anything else is reported
// as internal, without its text.
var (
	// ErrBadRequest: the request is malformed or does not fit the agent's state.
	ErrBadRequest = errors.New("bad request")
	// ErrNotFound: the agent does not know the migration or guest.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the request contradicts what the agent already did (for example abort
	// after commit on the destination).
	ErrConflict = errors.New("conflict")
)

// codes pairs the Handler sentinels with their codes. The server answers with it
// (codes.Public: any other error is internal, its text kept in the agent's log); the Client
// returns error answers that match both the code and the sentinel (codes.Sentinel).
var codes = wireerr.Table{
	{Err: ErrBadRequest, Code: CodeBadRequest},
	{Err: ErrNotFound, Code: CodeNotFound},
	{Err: ErrConflict, Code: CodeConflict},
}

// withSentinel returns err with the Handler sentinel of its code attached, when it is an
// agent's error answer with one of the agent API's codes.
func withSentinel(err error) error { return codes.Sentinel(err, "agent error ") }

// DowntimeLimit is the downtime limit of a migration: the operator's limit, lowered to the
// tenant's (its policy's spec.transport.maxDowntime) where the tenant's is smaller. A tenant
// never raises it. Zero on either side means that side sets no limit; zero on both means
// none. The broker sets TransferRequest.MaxDowntime to it, and the source agent takes it
// again of that request and the grant's limit, so that a broker cannot loosen the tenant's.
func DowntimeLimit(operator, tenant time.Duration) time.Duration {
	switch {
	case tenant <= 0:
		return max(operator, 0)
	case operator <= 0:
		return tenant
	}
	return min(operator, tenant)
}
