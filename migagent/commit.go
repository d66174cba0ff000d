package migagent

import (
	"crypto/hmac"
	"fmt"
)

// Commit is the destination's commit acknowledgement: proof, checkable by anyone who holds
// TK, that the destination received the whole transfer whose transcript it names.
type Commit struct {
	// MigrationID is the migration committed.
	MigrationID string `json:"migrationId"`
	// Transcript is SHA-256("lethe/v1/commit" ‖ handshake transcript hash ‖ the transcript
	// hash of every stream's FIN, in stream order).
	Transcript []byte `json:"transcript"`
	// MAC is HMAC-SHA256(K, Transcript) with K = HKDF-SHA256(TK, salt = migration id,
	// info = "lethe/v1/commit").
	MAC []byte `json:"mac"`
}

// Verify checks the acknowledgement's MAC under tk. It returns an error wrapping
// ErrCommitAck if it does not verify, ErrKeyDestroyed if tk was destroyed.
func (c Commit) Verify(tk *SecretKey) error {
	k, err := macKey(tk, c.MigrationID, commitInfo)
	if err != nil {
		return fmt.Errorf("verifying commit: %w", err)
	}
	defer clear(k)
	if !hmac.Equal(c.MAC, mac(k, c.Transcript)) {
		return fmt.Errorf("verifying commit: %w", ErrCommitAck)
	}
	return nil
}
