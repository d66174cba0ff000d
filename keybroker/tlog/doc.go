// Package tlog defines Lethe's residency log: an append-only Merkle tree log (RFC 9162
// hashing and proofs) of every key decision the keybroker makes, with signed checkpoints
// (C2SP tlog-checkpoint, in the signed-note format) and witness cosignatures (C2SP
// tlog-cosignature), and verifies what a tenant needs offline: that an entry is in the log,
// that one checkpoint extends another, and that the guest history it is given is complete
// from the guest's first entry up to its last (whether later entries were withheld it cannot
// tell: see below).
//
// A receipt proves one migration the tenant knows of. The log answers for those it does not:
// every adoption, release, reissue, denial, commit, abort and cleanup is an Entry; the entries
// of one guest form a chain (Seq counts them from 1, Prev names the previous one by index and
// leaf hash), and the epochs they move the guest through must follow one another
// (VerifyHistory), so a deleted, reordered or altered entry breaks the chain or its inclusion
// proof. A checkpoint that does not extend an earlier one (a keybroker showing different
// tenants different logs, or rewriting history) fails the consistency proof a tenant or a
// witness checks against the checkpoint it pinned.
//
// This package holds no state and does no I/O: the keybroker stores the log (package
// keybroker, in Vault), lethectl fetches and verifies it. It imports no Vault or NATS code
// and must never do so: a second verifier needs only docs/log.md, and this package is the
// reference one.
//
// What it cannot prove: that the newest entries of a guest were not withheld from the answer
// a tenant got (a chain is complete up to the entry it ends with; a monitor reading the whole
// log sees what a query left out), and that the keybroker logged a decision it made while
// compromised (the log is the keybroker's own statement; it makes that statement permanent
// and the same for everyone, not true).
package tlog
