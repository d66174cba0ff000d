package tlog

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/transparency-dev/merkle/rfc6962"

	"github.com/lethe-cc/lethe/attest"
)

// EntryType is the value of Entry.Type.
const EntryType = "lethe.dev/v1/LogEntry"

// Kind is what key decision an entry records.
type Kind string

// The kinds of entries.
const (
	// KindAdopt: the guest's first epoch key was created and MDK_1 sealed to the agent of
	// Host. FromEpoch 0, ToEpoch 1.
	KindAdopt Kind = "adopt"
	// KindRelease: a migration's keys were sealed to its source and destination (Host):
	// TK to both, MDK_ToEpoch to the destination. ToEpoch = FromEpoch+1. A migration
	// released again (the broker repeated its attestation) has one entry per release.
	KindRelease Kind = "release"
	// KindReissue: the live epoch's MDK was sealed again to a restarted agent on Host.
	// FromEpoch = ToEpoch = the live epoch.
	KindReissue Kind = "reissue"
	// KindDeny: a request for the guest's keys was refused; Op names it and Reasons say why.
	// Nothing was released.
	KindDeny Kind = "deny"
	// KindCommit: the migration committed; the source's keys (the migration key and epoch
	// FromEpoch) are destroyed (DestroyedKeys) and ToEpoch is the live epoch. Statement is the
	// digest of the receipt's payload.
	KindCommit Kind = "commit"
	// KindAbort: the migration aborted; the destination's keys (the migration key and epoch
	// ToEpoch) are destroyed and FromEpoch stays live. Statement is the receipt's digest.
	KindAbort Kind = "abort"
	// KindCleanup: a release or adoption failed after its keys were created; they are
	// destroyed (DestroyedKeys). No receipt.
	KindCleanup Kind = "cleanup"
	// KindForget: the guest was forgotten (its VM gone for good), on a statement signed by
	// its tenant or the operator's admin key: the live epoch's key is destroyed
	// (DestroyedKeys) and the guest is no longer adopted. FromEpoch is the epoch that was
	// live, ToEpoch 0; MigrationID names the forget; Statement is the digest of the signed
	// statement. The guest may be adopted again.
	KindForget Kind = "forget"
)

var kinds = map[Kind]bool{KindAdopt: true, KindRelease: true, KindReissue: true, KindDeny: true, KindCommit: true, KindAbort: true, KindCleanup: true, KindForget: true}

// Link names an entry of the log: its index and its leaf hash.
type Link struct {
	Index uint64          `json:"index"`
	Hash  attest.HexBytes `json:"hash"`
}

// Entry is one key decision. Its leaf in the tree is its JSON encoding (Marshal), exactly as
// stored; the leaf hash is RFC 9162's SHA-256(0x00 ‖ leaf).
type Entry struct {
	Type   string `json:"type"`
	Kind   Kind   `json:"kind"`
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	// Seq numbers the guest's entries from 1; Prev is the guest's entry Seq-1 (absent for
	// Seq 1).
	Seq  uint64 `json:"seq"`
	Prev *Link  `json:"prev,omitempty"`

	// MigrationID is the migration, adoption, reissue or forget the decision belongs to.
	MigrationID string `json:"migrationId"`
	FromEpoch   uint64 `json:"fromEpoch"`
	ToEpoch     uint64 `json:"toEpoch"`
	// Host is the host the keys were sealed to (adopt, reissue; the destination of a
	// release), as the keybroker's signed statement names it; for a denied release, the
	// destination refused.
	Host string `json:"host,omitempty"`
	// Statement is the SHA-256 of the signed statement of the decision: the grant of an
	// adoption, release or reissue (as the agent received it), the payload of the receipt of a
	// commit or abort, the signed statement that asked for a forget.
	Statement attest.HexBytes `json:"statement,omitempty"`
	// Evidence are the digests of the evidence the decision rested on (source, destination,
	// erasure), as the receipt and audit events quote them.
	Evidence []attest.HexBytes `json:"evidence,omitempty"`
	// Outcome is a commit's or abort's receipt outcome.
	Outcome string `json:"outcome,omitempty"`
	// DestroyedKeys are the Vault Transit keys a commit, abort, cleanup or forget destroyed.
	DestroyedKeys []string `json:"destroyedKeys,omitempty"`
	// Op and Reasons are a denial's request (adopt, release, reissue, destroy) and reasons.
	Op      string   `json:"op,omitempty"`
	Reasons []string `json:"reasons,omitempty"`
	// Time is when the keybroker appended the entry.
	Time time.Time `json:"time"`
}

// ErrMalformed is returned (wrapped) for an entry, checkpoint or proof that cannot be decoded.
var ErrMalformed = errors.New("malformed")

// Marshal returns the entry's leaf: its JSON encoding.
func (e *Entry) Marshal() ([]byte, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("encoding log entry: %w", err)
	}
	return b, nil
}

// ParseEntry decodes a leaf strictly (no unknown fields, no trailing data) and checks that it
// is an entry of a known kind naming a guest.
func ParseEntry(leaf []byte) (*Entry, error) {
	d := json.NewDecoder(bytes.NewReader(leaf))
	d.DisallowUnknownFields()
	var e Entry
	if err := d.Decode(&e); err != nil {
		return nil, fmt.Errorf("decoding log entry: %w: %w", ErrMalformed, err)
	}
	if d.More() {
		return nil, fmt.Errorf("decoding log entry: %w: trailing data", ErrMalformed)
	}
	switch {
	case e.Type != EntryType:
		return nil, fmt.Errorf("decoding log entry: %w: type %q, want %q", ErrMalformed, e.Type, EntryType)
	case !kinds[e.Kind]:
		return nil, fmt.Errorf("decoding log entry: %w: unknown kind %q", ErrMalformed, e.Kind)
	case e.Tenant == "" || e.VM == "":
		return nil, fmt.Errorf("decoding log entry: %w: no guest", ErrMalformed)
	case e.Seq == 0:
		return nil, fmt.Errorf("decoding log entry: %w: seq 0", ErrMalformed)
	case (e.Seq == 1) != (e.Prev == nil):
		return nil, fmt.Errorf("decoding log entry: %w: seq %d with prev %v", ErrMalformed, e.Seq, e.Prev != nil)
	}
	// One encoding only: Go's decoder folds case, keeps the last of duplicated fields and
	// reads hex loosely, so a leaf the keybroker did not write could read one way here and
	// another in a second verifier.
	if b, err := e.Marshal(); err != nil || !bytes.Equal(b, leaf) {
		return nil, fmt.Errorf("decoding log entry: %w: not as the keybroker encodes it", ErrMalformed)
	}
	return &e, nil
}

// LeafHash returns RFC 9162's hash of a leaf: SHA-256(0x00 ‖ leaf).
func LeafHash(leaf []byte) []byte { return rfc6962.DefaultHasher.HashLeaf(leaf) }

// StatementDigest returns the SHA-256 of a signed statement (a grant, a receipt's payload).
func StatementDigest(b []byte) []byte {
	d := sha256.Sum256(b)
	return d[:]
}

// EpochKey returns the name of a guest's epoch key in Vault Transit, as entries name it in
// DestroyedKeys.
func EpochKey(tenant, vm string, epoch uint64) string {
	return "lethe-" + tenant + "-" + vm + "-e" + strconv.FormatUint(epoch, 10)
}

// MigrationKey returns the name of a migration's key in Vault Transit.
func MigrationKey(id string) string { return "lethe-mig-" + id }
