package dataplane

import (
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/keybroker/grant"
)

// Errors that end a migration. Functions that return them document which; match them with
// errors.Is.
var (
	// ErrKeyConfirmation means the peer did not prove that it holds both TK and the HPKE
	// private key the grant names for it (Keys.PeerKey),
	// or that it saw the same handshake: it sent a wrong handshake MAC, a join MAC for
	// another session, or closed the connection during key confirmation. Nothing else is
	// sent after it.
	ErrKeyConfirmation = errors.New("key confirmation failed")
	// ErrHandshake means the peer's handshake was malformed or its parameters (migration id,
	// stream count, region geometry, zero-page setting) do not match this side's.
	ErrHandshake = errors.New("handshake mismatch")

	// ErrReorderedFrame means a frame arrived with a sequence number ahead of the next one
	// expected: a frame was dropped or frames were reordered.
	ErrReorderedFrame = errors.New("out-of-order frame")
	// ErrReplayedFrame means a frame arrived with a sequence number already received.
	ErrReplayedFrame = errors.New("repeated frame")
	// ErrTruncatedFrame means a frame was cut short, or a stream ended before its FIN.
	ErrTruncatedFrame = errors.New("truncated frame")
	// ErrFrameAuthentication means a frame's header or payload was altered, or it was sealed
	// under another key.
	ErrFrameAuthentication = errors.New("altered frame: authentication failed")
	// ErrMisroutedFrame means a frame names another stream than the connection it came on, or
	// carries pages that belong to another stream.
	ErrMisroutedFrame = errors.New("misrouted frame")
	// ErrMalformedFrame means a frame header is not well formed (version, type, reserved
	// bits, lengths, page range) or a frame came after its stream's FIN.
	ErrMalformedFrame = errors.New("malformed frame")
	// ErrZeroPagesNotAllowed means a zero-page frame arrived although zero-page elision is
	// not allowed.
	ErrZeroPagesNotAllowed = errors.New("zero-page frame not allowed")

	// ErrIncomplete means the destination's completeness check failed at FIN: counts or
	// transcript hashes differ, pages are missing, or the byte stream was not closed.
	ErrIncomplete = errors.New("transfer incomplete")
	// ErrCommitAck means the destination's commit acknowledgement is malformed, names
	// another transcript, or its MAC is wrong. It is grant.ErrCommitAck, so errors from
	// (*Commit).Verify match it too.
	ErrCommitAck = grant.ErrCommitAck
	// ErrCommitUnknown means the source sent its FIN but did not receive a valid commit
	// acknowledgement: the destination may or may not have committed. The guest is left
	// paused; the caller decides.
	ErrCommitUnknown = errors.New("commit outcome unknown")
	// ErrNotConverging means pre-copy could not bring the dirty set within what the source's
	// MaxDowntime allows in MaxRounds rounds: the source ended the migration without pausing
	// the guest.
	ErrNotConverging = errors.New("pre-copy did not converge within the downtime limit")
	// ErrPeerAborted means the peer ended the migration and said why.
	ErrPeerAborted = errors.New("peer aborted the migration")

	// ErrKeyDestroyed means a SecretKey was used after Destroy.
	ErrKeyDestroyed = errors.New("key destroyed")
	// ErrUsed means a single-use Source or Destination was run a second time.
	ErrUsed = errors.New("already used")
	// ErrNotPrepared means Destination.Receive was called before Destination.Prepare.
	ErrNotPrepared = errors.New("receive region not prepared")
	// ErrNotZero means a scrubbed region or spool did not read back as zero.
	ErrNotZero = errors.New("scrubbed memory did not read back as zero")
	// ErrSpoolCorrupt means a spool record failed authentication or is missing.
	ErrSpoolCorrupt = errors.New("spool record corrupt")
)

// FrameError is a rejected frame: where it came and why. Err is one of the frame sentinels
// (ErrReorderedFrame, ErrReplayedFrame, ErrTruncatedFrame, ErrFrameAuthentication,
// ErrMisroutedFrame, ErrMalformedFrame, ErrZeroPagesNotAllowed, ErrIncomplete).
type FrameError struct {
	// Stream is the index of the stream the frame came on.
	Stream uint32
	// Seq is the sequence number the receiver expected.
	Seq uint64
	// Type names the frame's type as read from its header ("" when the header was unreadable).
	Type string
	// Err is the reason.
	Err error
}

// Error describes the rejected frame.
func (e *FrameError) Error() string {
	if e.Type == "" {
		return fmt.Sprintf("stream %d frame %d: %v", e.Stream, e.Seq, e.Err)
	}
	return fmt.Sprintf("stream %d frame %d (%s): %v", e.Stream, e.Seq, e.Type, e.Err)
}

// Unwrap returns the reason, so errors.Is matches the sentinel.
func (e *FrameError) Unwrap() error { return e.Err }
