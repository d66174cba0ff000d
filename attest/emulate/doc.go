// Package emulate provides software SEV-SNP and TDX platforms for development and CI: attesters
// that sign reports and quotes with keys of their own, and the roots of trust (and, for TDX,
// the PCS collateral) that a Verifier must be configured with to accept them.
//
// Every emulated platform has fresh keys: the default keys of go-sev-guest's test signer are
// public, so evidence signed with them proves nothing. An emulator's keys can be saved to a
// directory and loaded again, so that several processes sign as the same platform.
//
// Emulated evidence names itself (emulated-sev-snp, emulated-tdx). It must never be accepted
// by a production verifier: only a Verifier given these roots accepts it, and only a policy
// that lists the emulated platform lets it release a key. Production binaries link this package
// only behind an explicit flag.
package emulate
