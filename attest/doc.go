// Package attest turns a platform's attestation evidence into verified, normalized claims.
//
// Evidence is what an agent presents to prove what it is: an AMD SEV-SNP attestation report
// (with the certificate table the firmware returns beside it) or an Intel TDX quote (v4, or v5
// of TDX 1.5), the agent's HPKE public key, and a statement it makes beside its identity (a
// clean-memory or erasure statement). The 64-byte REPORT_DATA of every report binds that context:
//
//	REPORT_DATA = SHA-512("lethe/v1/evidence" ‖ migration-id ‖ role ‖ nonce ‖
//	                      SHA-256(hpke-public-key) ‖ SHA-256(statement))
//
// [Verifier.Verify] is the one verification path for every platform, real or emulated: it
// checks the signature chain to a pinned root of trust using an offline collateral cache,
// checks revocation where collateral allows, checks REPORT_DATA against the expected binding,
// and returns [Claims]. [Claims.Check] evaluates baseline [Requirements] (minimum TCB, debug,
// measurements, …) through go-sev-guest's and go-tdx-guest's validate packages.
//
// SEV-SNP reports from Turin on are the exception: go-sev-guest v0.15.0 refuses Turin's
// certificates (their fmcSPL extension) and decodes Turin's TCB with the Milan layout, so this
// package reads the KDS extensions, lays out the TCB (fmc, bl, tee, snp, ucode) and checks a
// Turin report's signature, certificate chain and consistency with its certificate itself,
// with crypto/x509 and the library's report parsing.
//
// The offline collateral cache keeps each document under its vendor's URL (see
// collateralCache). An SEV-SNP endorsement key certificate the report's certificate table does
// not carry is looked up there: a VCEK under its AMD KDS URL (Turin's names the chip by the
// first 8 bytes of CHIP_ID and takes fmcSPL), a VLEK under the KDS VLEK URL of the report's
// product line and REPORTED_TCB, which is never fetched, since AMD serves VLEKs to cloud
// providers only: the operator places it (docs/configuration.md).
//
// Evidence from an emulated platform names itself (emulated-sev-snp, emulated-tdx) and is
// accepted only by a Verifier configured with that emulator's roots; the emulators live in
// package attest/emulate so that production binaries do not link them by accident.
//
// This package must never import NATS, Vault or libvirt (a test enforces it), never fetch
// collateral inside a caller's critical section unless the Verifier was configured to, and
// never accept evidence whose chain ends anywhere but a configured root.
package attest
