package broker

import (
	"cmp"
	"encoding/json"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Phase is where a migration is in the state machine.
type Phase string

// The phases of a migration (DESIGN.md, "The migration, phase by phase").
const (
	PhaseRequested    Phase = "Requested"
	PhaseAttesting    Phase = "Attesting"
	PhaseKeysReleased Phase = "KeysReleased"
	PhaseTransferring Phase = "Transferring"
	PhaseCuttingOver  Phase = "CuttingOver"
	PhaseCommitted    Phase = "Committed"
	PhaseErased       Phase = "Erased"
	PhaseAborting     Phase = "Aborting"
	PhaseAborted      Phase = "Aborted"
)

// Terminal reports whether nothing more happens to a migration in phase p.
func (p Phase) Terminal() bool { return p == PhaseErased || p == PhaseAborted }

// Abortable reports whether a migration in phase p can still be aborted (before the commit
// acknowledgement and not already aborting).
func (p Phase) Abortable() bool {
	switch p {
	case PhaseRequested, PhaseAttesting, PhaseKeysReleased, PhaseTransferring, PhaseCuttingOver:
		return true
	}
	return false
}

// Outcomes of a finished migration, as in receipts.
const (
	OutcomeErased = "erased"
	// OutcomeCommittedUnverifiedErasure: committed, the source's keys destroyed, but its
	// erasure not attested (the source host was lost before it could attest).
	OutcomeCommittedUnverifiedErasure = "committed-unverified-erasure"
	// OutcomeAbortedUnverifiedErasure: aborted after the keys were released, the destination's
	// keys destroyed, but its erasure (and that it never resumed the guest) not attested: its
	// host was lost before it could attest.
	OutcomeAbortedUnverifiedErasure = "aborted-unverified-erasure"
	OutcomeAborted                  = "aborted"
)

// Migration is the record of one migration, kept in the lethe-migrations bucket.
type Migration struct {
	ID          string          `json:"id"`
	Tenant      string          `json:"tenant"`
	VM          string          `json:"vm"`
	Source      string          `json:"source"`
	Destination string          `json:"destination"`
	Platform    attest.Platform `json:"platform"`
	MemoryBytes uint64          `json:"memoryBytes"`
	// Epoch is the guest's residency epoch at the source (e); a commit makes it e+1.
	Epoch uint64 `json:"epoch"`
	Phase Phase  `json:"phase"`
	// RequestedBy is "tenant:<name>" or "operator".
	RequestedBy string    `json:"requestedBy"`
	Created     time.Time `json:"created"`
	// Admitted is when the migration's hosts admitted it out of Requested (see admission.go);
	// zero before. Waiting says, while it waits in Requested, for what.
	Admitted   time.Time `json:"admitted,omitzero"`
	Waiting    string    `json:"waiting,omitempty"`
	PhaseSince time.Time `json:"phaseSince"`
	Updated    time.Time `json:"updated"`
	// Timeline lists the phases the migration entered, in order: when, and how long it
	// stayed (zero for the phase it is in).
	Timeline []PhaseEntry `json:"timeline,omitempty"`

	// Candidates are the hosts the broker may fall back to, best first, when the keybroker
	// denies the release to Destination. Set at creation only when the broker chose the
	// destination (an operator's or tenant's requested destination has none); each fallback
	// takes the first and removes it.
	Candidates []string `json:"candidates,omitempty"`
	// Attempts are the destinations the keybroker denied, in order, each with its reason; the
	// current Destination is not among them.
	Attempts []Attempt `json:"attempts,omitempty"`

	// Owner is the id of the broker holding the lease, until LeaseUntil.
	Owner      string    `json:"owner,omitempty"`
	LeaseUntil time.Time `json:"leaseUntil,omitzero"`

	DataEndpoint    string `json:"dataEndpoint,omitempty"`
	Streams         int    `json:"streams,omitempty"`
	ZeroPageElision bool   `json:"zeroPageElision,omitempty"`
	// DestinationLanes is what the destination said it accepts beyond the first stream
	// (agentapi.PrepareResponse.Lanes), passed to the source with the transfer.
	DestinationLanes int `json:"destinationLanes,omitempty"`
	// MaxDowntime is the transfer's downtime limit: the broker's (Config.MaxDowntime), lowered
	// to the tenant's policy's (spec.transport.maxDowntime). Zero means the agent's own.
	MaxDowntime time.Duration `json:"maxDowntime,omitempty"`
	// SourceKeys and DestinationKeys are the keys the keybroker sealed to each agent; the
	// broker cannot open them. They are never returned by the API.
	SourceKeys      []byte `json:"sourceKeys,omitempty"`
	DestinationKeys []byte `json:"destinationKeys,omitempty"`
	// Grant is the keybroker's signed statement of the release, delivered to both agents
	// with their keys (they refuse keys without it). It is public: it holds no secret.
	Grant []byte `json:"grant,omitempty"`
	// NextWrappedMDK is the Vault-wrapped memory data key of epoch e+1.
	NextWrappedMDK string `json:"nextWrappedMdk,omitempty"`
	// Evidence digests (hex SHA-256 of the raw attestation bytes).
	SourceEvidence      string `json:"sourceEvidence,omitempty"`
	DestinationEvidence string `json:"destinationEvidence,omitempty"`
	ErasureEvidence     string `json:"erasureEvidence,omitempty"`

	TransferStarted time.Time          `json:"transferStarted,omitzero"`
	Progress        *agentapi.Progress `json:"progress,omitempty"`
	LastProgress    time.Time          `json:"lastProgress,omitzero"`
	CommitAck       []byte             `json:"commitAck,omitempty"`
	// Downtime is how long the guest was paused at cutover, as the source reported with its
	// commit; DowntimeSource says who measured it (agentapi.DowntimeHypervisor or
	// DowntimeAgent). Zero until committed, or if the source did not measure it.
	Downtime       time.Duration `json:"downtime,omitempty"`
	DowntimeSource string        `json:"downtimeSource,omitempty"`
	// Rounds are the source's pre-copy rounds, as it reported them with its commit.
	Rounds []agentapi.RoundStats `json:"rounds,omitempty"`
	// ErasureRefused is why the keybroker refused the source's erasure evidence (the tenant's
	// policy does not accept it); the commit then asks for an unverified erasure.
	ErasureRefused string `json:"erasureRefused,omitempty"`

	AbortReason string `json:"abortReason,omitempty"`
	// Notes records what went wrong but did not stop the migration (an agent that could not
	// be reached during an abort, for example).
	Notes    []string  `json:"notes,omitempty"`
	Outcome  string    `json:"outcome,omitempty"`
	Finished time.Time `json:"finished,omitzero"`
}

// Attempt is a destination the keybroker denied the release to.
type Attempt struct {
	Destination string `json:"destination"`
	// Reason is the keybroker's denial, with every failing rule.
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	// Dropped says the destination confirmed it dropped its preparation (its HPKE key, its
	// data-plane listener and receive region). Until it does, the migration's end asks again.
	Dropped bool `json:"dropped,omitempty"`
}

// PhaseEntry is one phase of a migration's timeline.
type PhaseEntry struct {
	Phase   Phase     `json:"phase"`
	Entered time.Time `json:"entered"`
	// Duration is the time spent in the phase; zero while the migration is in it.
	Duration time.Duration `json:"duration,omitempty"`
}

// maxTimeline bounds a record's timeline; phases past it are not listed (a migration has at
// most seven).
const maxTimeline = 16

// enter moves m to phase p at now and records it in the timeline, closing the entry of the
// phase it leaves. It returns the time spent in the phase left.
func (m *Migration) enter(p Phase, now time.Time) time.Duration {
	inFrom := now.Sub(cmp.Or(m.PhaseSince, m.Created))
	if n := len(m.Timeline); n > 0 {
		m.Timeline[n-1].Duration = now.Sub(m.Timeline[n-1].Entered)
	}
	if len(m.Timeline) < maxTimeline {
		m.Timeline = append(m.Timeline, PhaseEntry{Phase: p, Entered: now})
	}
	m.Phase, m.PhaseSince, m.Updated = p, now, now
	return inFrom
}

// public returns a copy of m without what callers of the API need not see.
func (m *Migration) public() *Migration {
	c := *m
	c.SourceKeys, c.DestinationKeys, c.NextWrappedMDK, c.CommitAck = nil, nil, "", nil
	return &c
}

// Guest is the record of a guest Lethe has taken in, kept in the lethe-guests bucket under
// GuestKey(tenant, vm).
type Guest struct {
	Tenant   string          `json:"tenant"`
	VM       string          `json:"vm"`
	Host     string          `json:"host"`
	Platform attest.Platform `json:"platform"`
	// Epoch is the current residency epoch, from 1.
	Epoch uint64 `json:"epoch"`
	// WrappedMDK is the Vault-wrapped memory data key of the current epoch (vault:v1:…).
	WrappedMDK  string `json:"wrappedMdk,omitempty"`
	MemoryBytes uint64 `json:"memoryBytes,omitempty"`
	// Migration is the id of the migration in progress, if any: at most one per guest.
	Migration string    `json:"migration,omitempty"`
	Adopted   time.Time `json:"adopted"`
	Updated   time.Time `json:"updated"`
}

// GuestKey returns the key of a guest in the lethe-guests bucket.
func GuestKey(tenant, vm string) string { return tenant + "." + vm }

// PolicyRecord is a tenant's signed policy envelope as applied, kept in the lethe-policies
// bucket under the tenant's name (tenant-wide) or <tenant>.<vm>.
type PolicyRecord struct {
	Tenant string `json:"tenant"`
	// VM is empty for a tenant-wide policy.
	VM       string    `json:"vm,omitempty"`
	Envelope []byte    `json:"envelope"`
	Applied  time.Time `json:"applied"`
}

// Receipt is a signed receipt as stored in the lethe-receipts bucket.
type Receipt struct {
	MigrationID string `json:"migrationId"`
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	Outcome     string `json:"outcome"`
	// Envelope is the keybroker's signed receipt (a DSSE-style envelope), verbatim.
	Envelope json.RawMessage `json:"envelope"`
	// Log is the keybroker's proof (a tlog.Inclusion, JSON) that the migration's ending, an
	// entry naming this receipt, is in the residency log, verbatim; absent when the keybroker
	// sent none. The broker does not check it: lethectl receipt verify does.
	Log    json.RawMessage `json:"log,omitempty"`
	Stored time.Time       `json:"stored"`
	// Downtime is the migration record's downtime (Migration.Downtime), kept beside the
	// receipt for whoever reads it: it is not part of the signed receipt, and nothing signs it.
	Downtime time.Duration `json:"downtime,omitempty"`
}

// Event is what the broker publishes on lethe.v1.events.<migration-id> (stream LETHE_EVENTS).
type Event struct {
	Time        time.Time          `json:"time"`
	MigrationID string             `json:"migrationId"`
	Kind        string             `json:"kind"`
	Phase       Phase              `json:"phase,omitempty"`
	From        Phase              `json:"from,omitempty"`
	Progress    *agentapi.Progress `json:"progress,omitempty"`
	Message     string             `json:"message,omitempty"`
	Broker      string             `json:"broker,omitempty"`
	// InFrom is the time the migration spent in phase From, on a phase event.
	InFrom time.Duration `json:"inFrom,omitempty"`
	// Downtime is how long the guest was paused, on the event of the phase Committed.
	Downtime time.Duration `json:"downtime,omitempty"`
}

// Kinds of events.
const (
	EventPhase    = "phase"
	EventProgress = "progress"
	EventAudit    = "audit"
)

func digestHex(ev *attest.Evidence) string {
	if ev == nil {
		return ""
	}
	d := ev.Digest()
	return fmt.Sprintf("%x", d[:])
}
