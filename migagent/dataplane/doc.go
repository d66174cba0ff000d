// Package dataplane is the data plane of a Lethe migration agent: it moves a confidential
// guest's memory, or a hypervisor's own migration stream, from a source agent to a
// destination agent over TCP, encrypted end to end under the migration's transfer key TK,
// and it scrubs and zeroizes what each side must forget.
//
// # Transport
//
// The source dials the destination with one or more parallel TCP connections ("streams",
// like QEMU's multifd). The first connection carries key confirmation, which also makes each
// end prove that it is the attested agent: each end's evidence binds an ephemeral HPKE key
// ([Keys.Identity]), and the keybroker's grant names the peer's ([Keys.PeerKey]). The
// source's hello carries a KEM ciphertext to the destination's key, the destination's reply
// one to the source's (seal.Encapsulate, contexts "lethe/v1/possession/destination" and
// "lethe/v1/possession/source", each followed by the migration id); each end decapsulates
// the one it received, so that both hold the secrets ss_d and ss_s, and proves it with an
// HMAC-SHA256 over the handshake transcript T (migration id, stream count, region geometry,
// the zero-page setting, a random nonce from each side and both ciphertexts) under
//
//	K = HKDF-SHA256(TK ‖ ss_d ‖ ss_s, salt = T, info = "lethe/v1/confirm")
//
// A peer without TK, or without the HPKE private key the grant names for it, or a relay
// that rewrites or replays any part of the handshake, fails there ([ErrKeyConfirmation]),
// and neither side sends anything else. The other connections then join with a MAC under K
// bound to T.
//
// Every stream and direction has its own AES-256-GCM key:
//
//	key = HKDF-SHA256(TK ‖ ss_d ‖ ss_s, salt = T, info = "lethe/v1/stream" ‖ direction ‖ index)
//
// where direction is one byte, 's' (source to destination) or 'd' (destination to source),
// and index is the stream index as a 4-byte big-endian integer. A frame is a 32-byte header
// (version, type, stream, sequence number, page number or byte offset, page count, sealed
// length), authenticated as AAD, followed by the sealed payload (at most [MaxPayload] bytes
// of plaintext). The GCM nonce is the frame's sequence number, so a stream key must never
// serve two sessions: ss_d and ss_s are fresh in every session, so no two sessions share a
// stream key even under one TK, which the keybroker may seal again in a repeated release.
// A frame that is out of order, repeated, truncated, altered, misrouted or sealed under
// another key ends the migration with a [*FrameError] wrapping [ErrReorderedFrame],
// [ErrReplayedFrame], [ErrTruncatedFrame], [ErrFrameAuthentication], [ErrMisroutedFrame] or
// [ErrMalformedFrame]. Each stream ends with a FIN frame carrying its counts, its transcript
// hash and the memory digest: the memory root ([MemoryRoot]), a SHA-256 over the digests of
// 64-page chunks, each a SHA-256 over its pages' SHA-256s. Each end keeps these digests as it
// goes, the source of each page as it last sent it, the destination of each page as it last
// wrote it, so that the pause before cutover hashes only the pages of the final round, not
// the whole memory. The destination checks the FINs, that every page of the region arrived,
// and that the root of what it wrote equals the digest, before it returns a commit
// acknowledgement ([Commit], which is grant.CommitAck) MACed with a key derived from TK alone,
// so that the keybroker, which holds TK but neither KEM secret, can check it. A byte stream
// without a region has no memory digest (its field in the FINs is zero and unchecked): its
// completeness is the stream's own, every byte sealed in sequence and both directions ended
// with a half-close, and the destination acknowledges only after both have ended.
//
// [Source.Run] and [Destination.Receive] are single use and destroy TK when they return;
// they use [Keys.Identity] but never zeroize it (the caller owns it).
//
// # Sources of data
//
// One transport carries two kinds of data: guest memory pages from a [Region] (an
// in-process region or a memory-mapped guest RAM file) with dirty tracking and pre-copy
// rounds, and an opaque full-duplex byte stream (the hypervisor's migration stream) with
// half-close passed on.
//
// # Erasure
//
// The destination scrubs its receive region before anything arrives (zeroes written, then
// read back: [Region.Scrub]), which yields an [attest.CleanMemoryStatement] for its evidence. Anything kept outside the
// region is sealed under the memory data key MDK in a [Spool]. After commit the source
// zeroizes TK and MDK, scrubs its region and spool, and returns an [attest.ErasureStatement]; after a
// failed or aborted transfer the destination does the same with its own. Keys are held as
// [SecretKey] values in locked memory where the operating system allows.
//
// The source's memory digest is of what it sent, which is the paused guest's memory only if
// every writer of the region honours its contract (write, then MarkDirty; nothing writes
// after Pause returns). [SourceConfig.RehashPausedMemory] hashes the paused memory itself
// instead, catching a writer that does not, at the cost of a pass over all memory in the
// pause.
//
// This package must never write a guest page outside the region except sealed under MDK,
// never send a frame before key confirmation succeeds, never log a key or a page, and never
// derive a stream key from TK alone. Caveat: keys derived for AES-GCM and HMAC are expanded by
// the Go standard library into ordinary heap memory that is not locked and is only released,
// not zeroed, when the session ends, and so is the HPKE state ss_d and ss_s are exported
// from; the secrets this package holds itself are zeroed.
package dataplane
