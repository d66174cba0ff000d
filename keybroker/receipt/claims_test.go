package receipt

import (
	"encoding/json"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSameEnd(t *testing.T) {
	snp := EndClaims{Platform: "sev-snp", EvidenceDigest: []byte{1}, Measurement: []byte{2}, TCB: "bl=3,tee=0,snp=8,ucode=115", ChipID: []byte{3}}
	tdx := EndClaims{Platform: "tdx", EvidenceDigest: []byte{1}, Measurement: []byte{2}, TCB: "0304", FMSPC: []byte{4}}
	tests := map[string]struct {
		got, want EndClaims
		mismatch  *ClaimMismatch
	}{
		"same SNP chip, other evidence and TCB": {
			got: EndClaims{Platform: "sev-snp", EvidenceDigest: []byte{9}, Measurement: []byte{2}, TCB: "bl=3,tee=0,snp=9,ucode=115", ChipID: []byte{3}}, want: snp,
		},
		"same TDX FMSPC": {got: tdx, want: tdx},
		"another platform": {
			got: tdx, want: snp, mismatch: &ClaimMismatch{Claim: "platform", Got: "tdx", Want: "sev-snp"},
		},
		"another measurement": {
			got: EndClaims{Platform: "sev-snp", Measurement: []byte{7}, ChipID: []byte{3}}, want: snp,
			mismatch: &ClaimMismatch{Claim: "measurement", Got: "07", Want: "02"},
		},
		"another chip": {
			got: EndClaims{Platform: "sev-snp", Measurement: []byte{2}, ChipID: []byte{8}}, want: snp,
			mismatch: &ClaimMismatch{Claim: "chip", Got: "08", Want: "03"},
		},
		"no chip": {
			got: EndClaims{Platform: "sev-snp", Measurement: []byte{2}}, want: snp,
			mismatch: &ClaimMismatch{Claim: "chip", Got: "(none)", Want: "03"},
		},
		"another FMSPC": {
			got: EndClaims{Platform: "tdx", Measurement: []byte{2}, FMSPC: []byte{5}}, want: tdx,
			mismatch: &ClaimMismatch{Claim: "FMSPC", Got: "05", Want: "04"},
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := tt.got.SameEnd(tt.want)
			var got *ClaimMismatch
			if err != nil {
				var ok bool
				if got, ok = errors.AsType[*ClaimMismatch](err); !ok {
					t.Fatalf("SameEnd = %v, not a *ClaimMismatch", err)
				}
			}
			if diff := cmp.Diff(tt.mismatch, got); diff != "" {
				t.Errorf("SameEnd mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestErasureEvidenceJSON: the erasure evidence's claims sit in its own object, beside the
// statement, under the names EndClaims uses for the source and destination.
func TestErasureEvidenceJSON(t *testing.T) {
	er := ErasureEvidence{
		EndClaims: EndClaims{Platform: "sev-snp", EvidenceDigest: []byte{1}, Measurement: []byte{2}, TCB: "bl=1,tee=0,snp=8,ucode=115", ChipID: []byte{3}},
		Statement: json.RawMessage(`{"migrationId":"m1"}`),
		Accepted:  true,
	}
	b, err := json.Marshal(er)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"platform":"sev-snp","evidenceDigest":"01","measurement":"02","tcb":"bl=1,tee=0,snp=8,ucode=115","chipId":"03","statement":{"migrationId":"m1"},"accepted":true}`
	if string(b) != want {
		t.Errorf("ErasureEvidence JSON\n got %s\nwant %s", b, want)
	}
	var back ErasureEvidence
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(er, back); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
}
