package attest

import (
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
)

// ReportDataSize is the size of the REPORT_DATA field of SNP reports and TDX quotes.
const ReportDataSize = 64

// NonceSize is the size of a keybroker nonce.
const NonceSize = 32

// Role is what an agent is in a migration when it produces evidence.
type Role string

// The roles an agent's evidence can be bound to.
const (
	RoleSource      Role = "source"
	RoleDestination Role = "destination"
	// RoleErased is the source's final evidence, carrying its erasure statement.
	RoleErased Role = "erased"
	// RoleAdopt is the evidence of the first host of a guest (its first residency).
	RoleAdopt Role = "adopt"
)

// Valid reports whether r is one of the defined roles.
func (r Role) Valid() bool {
	switch r {
	case RoleSource, RoleDestination, RoleErased, RoleAdopt:
		return true
	}
	return false
}

// Evidence is what an agent presents: the platform's raw attestation bytes, the agent's HPKE
// public key and its statement, all bound together through REPORT_DATA. It encodes as JSON for
// the wire and for files; byte strings are base64, as encoding/json does.
type Evidence struct {
	// Platform says how Raw is to be read and which roots may sign it.
	Platform Platform `json:"platform"`
	// Raw is, for SEV-SNP, the 1184-byte attestation report followed by its certificate table
	// exactly as configfs-tsm's auxblob returns it (the table may be empty); for TDX, a quote v4 or v5.
	Raw []byte `json:"raw"`
	// HPKEPublicKey is the agent's ephemeral HPKE public key for this migration (may be empty
	// for evidence that releases nothing, such as the source's erasure evidence).
	HPKEPublicKey []byte `json:"hpkePublicKey,omitempty"`
	// Statement is canonical JSON that the agent asserts beside its identity. It travels
	// base64-encoded, like Raw, so that re-formatting an evidence file cannot change the bytes
	// that REPORT_DATA binds.
	Statement []byte `json:"statement,omitempty"`
}

// maxEvidenceSize bounds decoded evidence: a report with a full certificate table or a quote
// with its PCK chain is a few KiB, so anything this large is hostile.
const maxEvidenceSize = 1 << 20

// ParseEvidence decodes evidence JSON. It checks shape only; it proves nothing.
func ParseEvidence(b []byte) (*Evidence, error) {
	if len(b) > maxEvidenceSize {
		return nil, fmt.Errorf("decoding evidence: %d bytes exceeds the %d-byte limit", len(b), maxEvidenceSize)
	}
	var ev Evidence
	if err := json.Unmarshal(b, &ev); err != nil {
		return nil, fmt.Errorf("decoding evidence: %w", err)
	}
	if ev.Platform == PlatformUnknown {
		return nil, errors.New("decoding evidence: no platform")
	}
	if len(ev.Raw) == 0 {
		return nil, errors.New("decoding evidence: no raw attestation bytes")
	}
	if len(ev.Statement) > 0 && !json.Valid(ev.Statement) {
		return nil, errors.New("decoding evidence: statement is not valid JSON")
	}
	return &ev, nil
}

// Digest returns SHA-256 over the raw attestation bytes: the evidence's identity in audit
// events and receipts.
func (ev *Evidence) Digest() [32]byte { return sha256.Sum256(ev.Raw) }

// Binding is the context a piece of evidence must be bound to.
type Binding struct {
	MigrationID   string
	Role          Role
	Nonce         []byte
	HPKEPublicKey []byte
	Statement     []byte
}

// ReportData returns the REPORT_DATA that evidence made for b must carry. Every variable-length
// field is length-prefixed so that no two bindings share an encoding.
func (b Binding) ReportData() [ReportDataSize]byte {
	h := sha512.New()
	writeField := func(p []byte) {
		var n [4]byte
		n[0], n[1], n[2], n[3] = byte(len(p)>>24), byte(len(p)>>16), byte(len(p)>>8), byte(len(p))
		h.Write(n[:])
		h.Write(p)
	}
	keyDigest := sha256.Sum256(b.HPKEPublicKey)
	stmtDigest := sha256.Sum256(b.Statement)
	writeField([]byte("lethe/v1/evidence"))
	writeField([]byte(b.MigrationID))
	writeField([]byte(b.Role))
	writeField(b.Nonce)
	writeField(keyDigest[:])
	writeField(stmtDigest[:])
	var out [ReportDataSize]byte
	copy(out[:], h.Sum(nil))
	return out
}

// BindingFor returns the binding of evidence that carries ev's key and statement.
func BindingFor(migrationID string, role Role, nonce []byte, ev *Evidence) Binding {
	return Binding{MigrationID: migrationID, Role: role, Nonce: nonce, HPKEPublicKey: ev.HPKEPublicKey, Statement: ev.Statement}
}

// Attester produces evidence carrying the given REPORT_DATA. Real attesters talk to the
// platform's guest device; emulated ones sign in software.
type Attester interface {
	// Platform returns the platform this attester's evidence names.
	Platform() Platform
	// Attest returns the raw attestation bytes (see Evidence.Raw) for reportData.
	Attest(ctx context.Context, reportData [ReportDataSize]byte) ([]byte, error)
}

// Produce makes evidence for binding b with attester a.
func Produce(ctx context.Context, a Attester, b Binding) (*Evidence, error) {
	raw, err := a.Attest(ctx, b.ReportData())
	if err != nil {
		return nil, fmt.Errorf("producing %v evidence: %w", a.Platform(), err)
	}
	return &Evidence{Platform: a.Platform(), Raw: raw, HPKEPublicKey: b.HPKEPublicKey, Statement: b.Statement}, nil
}
