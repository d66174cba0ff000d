package attest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// The statement types: every statement names what it is, so that one kind can never be
// presented as another.
const (
	StatementCleanMemory = "lethe.dev/clean-memory/v1"
	StatementErasure     = "lethe.dev/erasure/v1"
)

// The names of the keys an agent reports zeroized in an ErasureStatement.
const (
	KeyTransfer   = "tk"  // the migration's transfer key
	KeyMemoryData = "mdk" // the memory data key of the residency that ended
	KeyHPKE       = "hpke"
)

// ErrNotCanonical is returned by the statement parsers for JSON that is valid but not in the
// canonical form (sorted keys, no insignificant whitespace) that CanonicalJSON produces.
// Statements are hashed into REPORT_DATA, so there must be exactly one encoding of each.
var ErrNotCanonical = errors.New("statement is not canonical JSON")

// CleanMemoryStatement is what a destination agent asserts beside its evidence: the region
// that will receive the guest was zeroed and read back as zero, how large it is, and the
// launch measurement of the freshly launched target context.
type CleanMemoryStatement struct {
	// Type is StatementCleanMemory.
	Type string `json:"type"`
	// Zeroed says the receive region was written with zeros.
	Zeroed bool `json:"zeroed"`
	// VerifiedZero says the region was read back and every byte was zero.
	VerifiedZero bool `json:"verifiedZero"`
	// Bytes is the size of the receive region.
	Bytes uint64 `json:"bytes"`
	// LaunchMeasurement is the launch measurement of the target context (48 bytes), empty if
	// the agent cannot tell.
	LaunchMeasurement HexBytes `json:"launchMeasurement,omitempty"`
	// DataEndpoint is the host:port where the destination's data plane listens for this
	// migration. Bound into the evidence, it is the address the keybroker's grant names and
	// the only one the source sends to, whatever the broker says.
	DataEndpoint string `json:"dataEndpoint,omitempty"`
}

// ErasureStatement is what a source agent asserts in its final evidence after a commit: which
// keys it zeroized and how much it scrubbed.
type ErasureStatement struct {
	// Type is StatementErasure.
	Type string `json:"type"`
	// MigrationID is the migration whose commit ended the residency.
	MigrationID string `json:"migrationId"`
	// KeysZeroized names the keys zeroized (KeyTransfer, KeyMemoryData, KeyHPKE).
	KeysZeroized []string `json:"keysZeroized"`
	// PagesScrubbed is the number of guest pages overwritten.
	PagesScrubbed uint64 `json:"pagesScrubbed"`
	// PageBytesScrubbed is the number of bytes those pages held.
	PageBytesScrubbed uint64 `json:"pageBytesScrubbed"`
	// SpoolBytesScrubbed is the number of bytes of spool files and buffers overwritten.
	SpoolBytesScrubbed uint64 `json:"spoolBytesScrubbed"`
}

// Encode returns s as canonical JSON, with Type set.
func (s CleanMemoryStatement) Encode() ([]byte, error) {
	s.Type = StatementCleanMemory
	return CanonicalJSON(s)
}

// Encode returns s as canonical JSON, with Type set.
func (s ErasureStatement) Encode() ([]byte, error) {
	s.Type = StatementErasure
	return CanonicalJSON(s)
}

// ParseCleanMemoryStatement decodes a clean-memory statement. It returns ErrNotCanonical for
// JSON that is not canonical, and an error for unknown fields or another statement type.
func ParseCleanMemoryStatement(b []byte) (*CleanMemoryStatement, error) {
	var s CleanMemoryStatement
	if err := decodeStatement(b, &s); err != nil {
		return nil, fmt.Errorf("decoding clean-memory statement: %w", err)
	}
	if s.Type != StatementCleanMemory {
		return nil, fmt.Errorf("decoding clean-memory statement: type %q, want %q", s.Type, StatementCleanMemory)
	}
	return &s, nil
}

// ParseErasureStatement decodes an erasure statement. It returns ErrNotCanonical for JSON
// that is not canonical, and an error for unknown fields or another statement type.
func ParseErasureStatement(b []byte) (*ErasureStatement, error) {
	var s ErasureStatement
	if err := decodeStatement(b, &s); err != nil {
		return nil, fmt.Errorf("decoding erasure statement: %w", err)
	}
	if s.Type != StatementErasure {
		return nil, fmt.Errorf("decoding erasure statement: type %q, want %q", s.Type, StatementErasure)
	}
	return &s, nil
}

// maxStatementSize bounds a statement: they are a few hundred bytes.
const maxStatementSize = 64 << 10

func decodeStatement(b []byte, v any) error {
	if len(b) > maxStatementSize {
		return fmt.Errorf("%d bytes exceeds the %d-byte limit", len(b), maxStatementSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the statement")
	}
	canon, err := CanonicalJSON(json.RawMessage(b))
	if err != nil {
		return err
	}
	if !bytes.Equal(canon, b) {
		return ErrNotCanonical
	}
	return nil
}

// CanonicalJSON encodes v as JSON with object keys sorted, no insignificant whitespace and no
// HTML escaping. Numbers keep their text. Encoding the result again yields the same bytes.
func CanonicalJSON(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encoding canonical JSON: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var generic any
	if err := dec.Decode(&generic); err != nil {
		return nil, fmt.Errorf("encoding canonical JSON: %w", err)
	}
	var out bytes.Buffer
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	// encoding/json writes map keys sorted and no whitespace.
	if err := enc.Encode(generic); err != nil {
		return nil, fmt.Errorf("encoding canonical JSON: %w", err)
	}
	return bytes.TrimSuffix(out.Bytes(), []byte("\n")), nil
}
