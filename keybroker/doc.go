// Package keybroker releases a confidential guest's keys from Vault to attested agents only,
// destroys them when a residency or a migration ends, and signs the erasure receipts that
// prove it.
//
// It is the only package in Lethe that talks to Vault. Per guest it keeps, beside the keys,
// what it must be able to trust (DESIGN.md, "Keys and crypto-erasure"): in a KV v2 mount the
// tenant's registered Ed25519 policy key and last accepted policySvn, and the guest's
// residency epoch with its migration in progress, and for every migration ID the guest it
// belongs to (migration-ids/<id>, created check-and-set 0 by the first request that names the
// ID, marked ended with the receipt, never deleted); in Transit one key per epoch
// (lethe-<tenant>-<vm>-e<e>) and one per migration (lethe-mig-<id>), aes256-gcm96, never
// exportable, never with plaintext backup.
//
// Vault is the only state keybrokers share, so any keybroker of a queue group can answer any
// request. That holds for nonces too ([Keybroker.IssueNonce]): a nonce carries its expiry and
// an HMAC over (migration, role, random part, expiry) under a 32-byte nonce key common to the
// keybrokers on one Vault (drawn once from Transit key lethe-nonce-wrapping, kept wrapped in KV
// at config/nonce-key, loaded once per process), so any keybroker checks one that another
// issued without a lookup; and consuming it is one check-and-set-0 write of a mark under
// nonces/ in KV, which exactly one consumer wins. Run deletes the marks of nonces expired for
// more than a minute (the clock skew tolerated between keybrokers).
//
// [Keybroker.Release] verifies both ends' evidence (in parallel), consumes their nonces,
// verifies the tenant's signed policy and its policySvn, evaluates it, and only then creates
// the epoch-(e+1) key and the migration key, draws MDK_{e+1} and the transfer key TK, seals TK
// to the source and TK and MDK_{e+1} to the destination (package seal) and wipes the
// plaintexts. Any failure after the keys exist destroys them again (fail closed).
// [Keybroker.Adopt] creates a guest's first epoch; [Keybroker.Reissue] seals the current
// epoch's MDK again (Transit decrypt of its wrapped form) to an agent that restarted and
// attested afresh. [Keybroker.Destroy] ends a migration:
// commit destroys the migration key and epoch e, abort the migration key and epoch e+1; no
// request can destroy both epochs of a guest. A commit must be proven first: the destination's
// commit acknowledgement, whose MAC the keybroker checks under the migration's TK (unwrapped
// from Transit for that check only), and the source's erasure evidence, which must come from
// the source the keys were released to (same platform, measurement, chip ID or FMSPC) and
// satisfy the tenant's policy for the receipt to say erased. Without that evidence a commit is
// refused (ErrUnproven) unless the caller declares the source lost (UnverifiedErasure), and
// its receipt then says committed-unverified-erasure; evidence from another machine or image
// is refused always. A destruction that cannot complete because Vault
// is unreachable is written to a journal file under Config.StateDir (the journal cannot live in
// Vault, which is what is down) and retried by [Keybroker.Run] until it succeeds; the receipt
// (package receipt, signed with the Transit ed25519 key lethe-receipt-signing) exists only
// after every key is gone.
//
// Every release and every denial is one audit event ([AuditSink]) carrying evidence digests,
// the policy digest and svn, the decision and its reasons. The keybroker must never log or
// audit a key, a sealed blob, a Vault token or raw evidence, never release a key without fresh
// evidence that satisfies the tenant's signed policy, and never let an untrusted caller (the
// broker, NATS) choose which Vault key to destroy: it derives key names from its own records.
//
// Caveats: plaintext keys are wiped once sealed, but Vault's HTTP responses carry them base64
// encoded in strings that Go cannot wipe; they are dropped and left to the garbage collector.
// A nonce issued for a (migration, role) does not void an earlier one: each is valid, once,
// until its own expiry. Whoever can read the nonce key (Vault's KV and Transit decrypt under
// lethe-nonce-wrapping) can mint nonces, but none that expires later than a TTL and a minute
// ahead, nor use one twice. Vault snapshots taken while a key lived still hold it.
//
// Key names and receipts follow from a migration ID alone (lethe-mig-<id>, receipts/<id>), so
// an ID is bound to one guest for good: a release, destroy or journaled retry naming another
// guest's ID is refused (ErrInvalidRequest) before any key or receipt is touched, and an ID
// that has ended is never released again.
//
// [Keybroker.Forget] forgets a guest whose VM is gone for good: on a statement signed by its
// tenant's policy key or the admin key (never on the broker's word), it destroys the live
// epoch's key, logs a forget and releases the guest's record, so that the name can be adopted
// again; it is journaled and retried like a destruction. A reissue holds the guest's record
// from before it unwraps the key until its log entry is written (reissueMarker), across
// keybrokers, so that no forget or commit ends the epoch in between and the guest's history
// keeps verifying.
//
// Release and Destroy are repeatable, because the broker reruns a step after a crash: a
// repeated release of a released migration, with fresh nonces and evidence, seals the same
// migration's keys to the new HPKE keys; a repeated ending returns the same receipt without
// its proof being checked again (the migration key is gone by then; the receipt is the
// proof); and an abort of a migration never released still ends with an abort receipt.
//
// The API is plain Go with the JSON-encodable request and response types of package kbwire,
// which the broker shares, so that tests and tools can call it directly;
// package natsapi offers it over NATS. This package imports no NATS.
package keybroker
