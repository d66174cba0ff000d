package emulate_test

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"testing"

	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"

	sevabi "github.com/google/go-sev-guest/abi"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// TestRevoke revokes one chip of an emulator that several processes share through its
// directory, with a Verifier that loaded the emulator's roots before: the revoked chip's
// evidence is rejected as revoked from then on, also when the chip's process reopens the
// emulator later; another chip of the same emulator, and the same chip with revocations
// unchecked, still verify.
func TestRevoke(t *testing.T) {
	revokedChip := bytes.Repeat([]byte{0xde}, 64)
	otherChip := bytes.Repeat([]byte{0x0c}, 64)
	for _, p := range []attest.Platform{attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX} {
		t.Run(p.String(), func(t *testing.T) {
			dir := t.TempDir()
			if _, err := emulate.Open(dir, p, emulate.Options{}); err != nil {
				t.Fatal(err)
			}
			roots, err := attest.LoadRoots(dir)
			if err != nil {
				t.Fatal(err)
			}
			checking, err := attest.NewVerifier(attest.Config{Roots: roots, CheckRevocations: true})
			if err != nil {
				t.Fatal(err)
			}
			unchecked, err := attest.NewVerifier(attest.Config{Roots: roots})
			if err != nil {
				t.Fatal(err)
			}
			verify := func(v *attest.Verifier, chip []byte) attest.Reason {
				t.Helper()
				// Each "process" opens the shared directory, as agents do.
				e, err := emulate.Open(dir, p, emulate.Options{ChipID: chip})
				if err != nil {
					t.Fatal(err)
				}
				raw, err := e.Attest(t.Context(), [attest.ReportDataSize]byte{1})
				if err != nil {
					t.Fatal(err)
				}
				_, err = v.Verify(t.Context(), &attest.Evidence{Platform: p, Raw: raw}, attest.Expectation{ReportData: []byte{1}})
				return attest.ReasonOf(err)
			}
			if got := verify(checking, revokedChip); got != "" {
				t.Fatalf("before the revocation: reason %q, want success", got)
			}

			e, err := emulate.Open(dir, p, emulate.Options{ChipID: revokedChip})
			if err != nil {
				t.Fatal(err)
			}
			if err := e.Revoke(); err != nil {
				t.Fatal(err)
			}
			if err := e.Save(dir); err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				name string
				v    *attest.Verifier
				chip []byte
				want attest.Reason
			}{
				{"revoked chip", checking, revokedChip, attest.ReasonRevoked},
				{"other chip", checking, otherChip, ""},
				{"revoked chip after the other reopened", checking, revokedChip, attest.ReasonRevoked},
				{"revoked chip, revocations unchecked", unchecked, revokedChip, ""},
			} {
				if got := verify(tc.v, tc.chip); got != tc.want {
					t.Errorf("%s: reason %q, want %q", tc.name, got, tc.want)
				}
			}
		})
	}
}

// TestEndorsementKeyPerChip checks that the emulators certify one endorsement key
// certificate per chip (and TCB or FMSPC), the same whenever a process reopens the emulator,
// as AMD's KDS and Intel's PCS serve one per platform: a revocation can then name a chip.
func TestEndorsementKeyPerChip(t *testing.T) {
	a, b := bytes.Repeat([]byte{1}, 64), bytes.Repeat([]byte{2}, 64)
	for _, p := range []attest.Platform{attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX} {
		t.Run(p.String(), func(t *testing.T) {
			dir := t.TempDir()
			serial := func(chip []byte) string {
				t.Helper()
				e, err := emulate.Open(dir, p, emulate.Options{ChipID: chip})
				if err != nil {
					t.Fatal(err)
				}
				raw, err := e.Attest(t.Context(), [attest.ReportDataSize]byte{})
				if err != nil {
					t.Fatal(err)
				}
				return endorsementSerial(t, p, raw)
			}
			first := serial(a)
			if serial(b) == first {
				t.Error("two chips share an endorsement key certificate serial")
			}
			if again := serial(a); again != first {
				t.Errorf("reopening the emulator as the same chip gives serial %s, first %s", again, first)
			}
		})
	}
}

func endorsementSerial(t *testing.T, p attest.Platform, raw []byte) string {
	t.Helper()
	var der []byte
	switch p {
	case attest.PlatformEmulatedSEVSNP:
		table := &sevabi.CertTable{}
		if err := table.Unmarshal(raw[sevabi.ReportSize:]); err != nil {
			t.Fatal(err)
		}
		vcek, err := table.GetByGUIDString(sevabi.VcekGUID)
		if err != nil {
			t.Fatal(err)
		}
		der = vcek
	default:
		q, err := abi.QuoteToProto(raw)
		if err != nil {
			t.Fatal(err)
		}
		chain := q.(*pb.QuoteV4).GetSignedData().GetCertificationData().GetQeReportCertificationData().GetPckCertificateChainData().GetPckCertChain()
		blk, _ := pem.Decode(chain)
		if blk == nil {
			t.Fatal("no PCK certificate in the quote")
		}
		der = blk.Bytes
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c.SerialNumber.Text(16)
}
