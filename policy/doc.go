// Package policy reads, signs, verifies and evaluates a tenant's migration policies.
//
// A migration policy is a YAML document (apiVersion lethe.dev/v1, kind MigrationPolicy) that
// says where a tenant's guest may live and move: which platforms each end may be, the
// baseline each end's attestation claims must meet (minimum TCB, measurements, no debug, …),
// that the destination's TCB is at least the source's, which hosts and regions may receive the
// guest, that the destination proves its receive memory clean, how pages travel, how soon the
// source must be erased, and an optional CEL expression over both ends' claims. [Parse] reads
// one strictly: every unknown field, wrong type, bad hex length and impossible value is reported
// with its file:line:col, all of them at once. [DefaultsYAML] is the one place defaults are
// written down.
//
// A tenant signs a policy with its Ed25519 key into an [Envelope] (DSSE: the exact YAML bytes
// and signatures over their pre-authentication encoding). [Verify] checks the signature and
// parses the payload; [CheckRollback] refuses a policySvn lower than the floor of the policy's
// (tenant, name), which the keybroker raises only when the tenant publishes a policy.
//
// [Evaluate] decides a migration from verified claims: it is pure (no I/O, no clock, no
// randomness), denies by default and names every failing rule with the values involved, so
// that a denial explains itself. The baseline requirements of one end are checked by
// [attest.Claims.Check] (go-sev-guest's and go-tdx-guest's validate); this package adds what
// is about a migration rather than one report.
//
// This package must never perform I/O in Evaluate, never allow what it cannot evaluate (an
// error, a missing claim or a failing CEL expression is a denial), never accept an emulated
// platform that a policy does not list by name, and never import NATS, Vault or libvirt.
// Verifying claims is attest's job: Evaluate trusts the claims it is given, so callers must
// pass only claims returned by attest.Verifier.Verify.
package policy
