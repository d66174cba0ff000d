// Package receipt defines Lethe's erasure and abort receipts and verifies them offline.
//
// A receipt is a JSON document (Receipt) in a DSSE-style envelope (Envelope): a payload type,
// the payload, and Ed25519 signatures over the DSSE pre-authentication encoding of both. The
// keybroker signs with a key held in Vault Transit; a tenant pins that key's public half
// (PEM, see MarshalPublicKeyPEM) and checks receipts with Verify, needing nothing else: this
// package imports no Vault, NATS or network code and must never do so.
//
// A valid signature proves the keybroker issued the receipt. It does not prove more than the
// keybroker knew: that Vault deleted the named keys and that the evidence it verified carried
// the statements quoted. Vault snapshots or backups taken while a key existed still hold it;
// the receipt says so in its caveats.
package receipt

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// Kind is the value of Receipt.Kind.
const Kind = "lethe.dev/v1/ErasureReceipt"

// Outcome is how a migration ended.
type Outcome string

// The outcomes a receipt states.
const (
	// OutcomeErased: the migration committed; the source's keys (migration key and epoch e)
	// are destroyed, so what the guest left on the source is undecryptable.
	OutcomeErased Outcome = "erased"
	// OutcomeAborted: the migration aborted; the destination's keys (migration key and epoch
	// e+1) are destroyed and the guest runs on at the source.
	OutcomeAborted Outcome = "aborted"
	// OutcomeCommittedUnverifiedErasure: the migration committed (the destination's commit
	// acknowledgement verified) and the source's keys are destroyed, but the source's erasure
	// was not proven: it sent no erasure evidence (its host was lost), or its evidence did not
	// satisfy the tenant's policy (see Erasure.Reasons). What the source kept is undecryptable;
	// that it scrubbed it is not attested.
	OutcomeCommittedUnverifiedErasure Outcome = "committed-unverified-erasure"
	// OutcomeAbortedUnverifiedErasure: the migration aborted after its keys were released and
	// the destination's keys (migration key and epoch e+1) are destroyed, but the destination
	// did not prove that it erased what it received and never resumed the guest (its host was
	// lost): the guest should run on at the source; that it runs nowhere else is not attested.
	OutcomeAbortedUnverifiedErasure Outcome = "aborted-unverified-erasure"
)

// Receipt is what the keybroker signs when a migration has ended and its keys are destroyed.
type Receipt struct {
	Kind        string  `json:"kind"`
	MigrationID string  `json:"migrationId"`
	Tenant      string  `json:"tenant"`
	VM          string  `json:"vm"`
	Outcome     Outcome `json:"outcome"`

	Policy PolicyRef `json:"policy"`

	// Source and Destination are the two ends' evidence at release.
	Source      EndClaims `json:"source"`
	Destination EndClaims `json:"destination"`
	// CleanMemory is the destination's clean-memory statement, as its evidence carried it.
	CleanMemory json.RawMessage `json:"cleanMemoryStatement,omitempty"`
	// Erasure is the source's final evidence (committed migrations only; absent when the
	// source sent none).
	Erasure *ErasureEvidence `json:"erasure,omitempty"`
	// CommitAckDigest is the SHA-256 of the destination's commit acknowledgement (committed
	// migrations only), whose MAC under the migration's transfer key the keybroker verified
	// before it destroyed the source's keys; the digest lets whoever holds the acknowledgement
	// match it to this receipt.
	CommitAckDigest attest.HexBytes `json:"commitAckDigest,omitempty"`

	// FromEpoch is the guest's residency epoch at the source; ToEpoch the destination's.
	FromEpoch uint64 `json:"fromEpoch"`
	ToEpoch   uint64 `json:"toEpoch"`
	// DestroyedKeys are the Vault Transit keys deleted.
	DestroyedKeys []DestroyedKey `json:"destroyedKeys"`

	// EndedAt is when the keybroker was told of the commit or abort; IssuedAt when it signed.
	EndedAt  time.Time `json:"endedAt"`
	IssuedAt time.Time `json:"issuedAt"`

	// Caveats are limits of what the receipt proves, in words.
	Caveats []string `json:"caveats,omitempty"`
}

// PolicyRef names the signed policy a migration was released under.
type PolicyRef struct {
	Digest attest.HexBytes `json:"digest"`
	SVN    uint64          `json:"policySvn"`
}

// EndClaims are the key claims of one end's verified evidence.
type EndClaims struct {
	Platform       string          `json:"platform"`
	EvidenceDigest attest.HexBytes `json:"evidenceDigest"`
	// Measurement is the SNP launch measurement or the TDX MRTD.
	Measurement attest.HexBytes `json:"measurement,omitempty"`
	// TCB is the SNP reported TCB (bl=,tee=,snp=,ucode=) or the TDX TEE TCB SVN in hex.
	TCB    string          `json:"tcb,omitempty"`
	ChipID attest.HexBytes `json:"chipId,omitempty"`
	FMSPC  attest.HexBytes `json:"fmspc,omitempty"`
}

// ErasureEvidence is the source's final evidence: the key claims of that evidence (its digest
// among them), its erasure statement, and whether the tenant's policy accepts that erasure
// (keys zeroized, within the deadline). The keybroker quotes it only after checking that its
// claims name the same end as the receipt's Source (EndClaims.SameEnd): erasure evidence from
// another chip or another guest image is refused, not quoted.
type ErasureEvidence struct {
	// EndClaims are the key claims of the erasure evidence, in the JSON object itself
	// (platform, evidenceDigest, measurement, tcb, chipId, fmspc).
	EndClaims
	Statement json.RawMessage `json:"statement,omitempty"`
	// Accepted says the policy's erasure rules passed; Reasons lists those that failed.
	Accepted bool     `json:"accepted"`
	Reasons  []string `json:"reasons,omitempty"`
}

// DestroyedKey is a Vault Transit key the keybroker deleted.
type DestroyedKey struct {
	Name string `json:"name"`
	// LatestVersion is the key's last version before deletion (0 if it was already gone
	// when the keybroker came to delete it).
	LatestVersion int       `json:"latestVersion"`
	DestroyedAt   time.Time `json:"destroyedAt"`
}

// Summarize returns the key claims of verified evidence.
func Summarize(c *attest.Claims) EndClaims {
	if c == nil {
		return EndClaims{}
	}
	e := EndClaims{Platform: c.Platform.String(), EvidenceDigest: c.EvidenceDigest}
	switch {
	case c.SNP != nil:
		e.Measurement = c.SNP.Measurement
		e.TCB = c.SNP.ReportedTCB.String()
		e.ChipID = c.SNP.ChipID
	case c.TDX != nil:
		e.Measurement = c.TDX.MRTD
		e.TCB = c.TDX.TEETCBSVN.String()
		e.FMSPC = c.TDX.FMSPC
	}
	return e
}

// ClaimMismatch is an error of SameEnd: the first identifying claim in which two ends differ.
type ClaimMismatch struct {
	// Claim names the claim: "platform", "measurement", "chip" (SNP chip ID) or "FMSPC" (TDX).
	Claim string
	// Got is the checked end's value, Want the reference end's (hex for byte strings).
	Got, Want string
}

func (m *ClaimMismatch) Error() string {
	return fmt.Sprintf("%s %s, want %s", m.Claim, m.Got, m.Want)
}

// SameEnd checks that c, the key claims of one piece of evidence, come from the end whose
// claims are want: the same platform, the same measurement (SNP launch measurement, TDX MRTD),
// and the same chip ID (SNP) or FMSPC (TDX). It returns nil or a *ClaimMismatch naming the
// first claim that differs. TCB is not compared: firmware may be updated in place between two
// reports of one machine. Caveats: an FMSPC names a TDX platform model, not one machine, and an
// SNP guest whose policy masks the chip ID reports zeros, so for those SameEnd cannot tell
// machines of the same kind apart.
func (c EndClaims) SameEnd(want EndClaims) error {
	if c.Platform != want.Platform {
		return &ClaimMismatch{Claim: "platform", Got: c.Platform, Want: want.Platform}
	}
	for _, f := range []struct {
		claim     string
		got, want attest.HexBytes
	}{
		{"measurement", c.Measurement, want.Measurement},
		{"chip", c.ChipID, want.ChipID},
		{"FMSPC", c.FMSPC, want.FMSPC},
	} {
		if !bytes.Equal(f.got, f.want) {
			return &ClaimMismatch{Claim: f.claim, Got: hexOrNone(f.got), Want: hexOrNone(f.want)}
		}
	}
	return nil
}

func hexOrNone(b attest.HexBytes) string {
	if len(b) == 0 {
		return "(none)"
	}
	return b.String()
}

// Validate checks that r is complete enough to be signed or trusted.
func (r *Receipt) Validate() error {
	switch {
	case r.Kind != Kind:
		return fmt.Errorf("receipt kind %q, want %q", r.Kind, Kind)
	case r.MigrationID == "" || r.Tenant == "" || r.VM == "":
		return fmt.Errorf("receipt lacks its migration, tenant or VM")
	case r.Outcome != OutcomeErased && r.Outcome != OutcomeAborted && r.Outcome != OutcomeCommittedUnverifiedErasure && r.Outcome != OutcomeAbortedUnverifiedErasure:
		return fmt.Errorf("receipt outcome %q is not %q, %q, %q or %q", r.Outcome, OutcomeErased, OutcomeAborted, OutcomeCommittedUnverifiedErasure, OutcomeAbortedUnverifiedErasure)
	case r.Outcome == OutcomeErased && (r.Erasure == nil || !r.Erasure.Accepted):
		return fmt.Errorf("receipt says %q without accepted erasure evidence", OutcomeErased)
	case len(r.DestroyedKeys) == 0:
		return fmt.Errorf("receipt names no destroyed key")
	}
	return nil
}
