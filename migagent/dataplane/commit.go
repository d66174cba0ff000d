package dataplane

import "github.com/lethe-cc/lethe/keybroker/grant"

// Commit is the destination's commit acknowledgement: proof, checkable by anyone who holds
// TK (the keybroker among them), that the destination received the whole transfer whose
// transcript it names. Its MAC is under a key derived from TK alone, not from the session
// secret, so that the keybroker, which knows neither end's KEM secret, can check it with
// (*Commit).Verify, which returns an error wrapping ErrCommitAck when it does not verify.
type Commit = grant.CommitAck
