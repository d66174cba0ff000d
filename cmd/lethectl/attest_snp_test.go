package main

import (
	"cmp"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/internal/evidencetest"
)

// realEvidence returns the path of a real capture of the evidence corpus (package
// evidencetest). Test names number the captures (S1 to S20) as the corpus's SOURCES.md does.
func realEvidence(t *testing.T, rel string) string { return evidencetest.Path(t, rel) }

// decodedEvidence writes the bytes of the text file at p (hex or base64) to a temporary file,
// as lethectl takes raw reports.
func decodedEvidence(t *testing.T, p string, decode func(string) ([]byte, error)) string {
	t.Helper()
	text, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b, err := decode(strings.TrimSpace(string(text)))
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), filepath.Base(p)+".bin")
	if err := os.WriteFile(out, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestAttestVerifyCertificateFlags(t *testing.T) {
	const (
		trustee       = "confidential-containers_trustee/deps/verifier/test_data/snp/"
		constellation = "edgelesssys_constellation/internal/attestation/"
	)
	s2, s2VLEK := realEvidence(t, trustee+"test-vlek-report.bin"), realEvidence(t, trustee+"test-vlek.der")
	s1, s1VCEK := realEvidence(t, trustee+"test-report.bin"), realEvidence(t, trustee+"test-vcek.der")
	s11 := decodedEvidence(t, realEvidence(t, constellation+"snp/testdata/AttestationReportVLEK.hex"), hex.DecodeString)
	s11VLEK := realEvidence(t, constellation+"snp/testdata/vlek.pem")
	s12 := decodedEvidence(t, realEvidence(t, constellation+"aws/snp/testdata/report.txt"), base64.StdEncoding.DecodeString)
	s12VLEK := realEvidence(t, constellation+"aws/snp/testdata/vlek.pem")
	// S10 as stored: a report and 20 bytes that are no certificate table.
	s10, s10VCEK := realEvidence(t, constellation+"snp/testdata/attestation.bin"), realEvidence(t, constellation+"snp/testdata/vcek.cert")
	raw12, err := os.ReadFile(s12)
	if err != nil {
		t.Fatal(err)
	}
	akDigest := hex.EncodeToString(raw12[0x50:0x90]) // REPORT_DATA, the AK digest 87ab7c…0db2f
	if !strings.HasPrefix(akDigest, "87ab7c") || !strings.HasSuffix(akDigest, "0db2f") {
		t.Fatalf("S12's REPORT_DATA is %s, not the AK digest", akDigest)
	}

	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
		signer     string // of a success; empty: vlek
	}{
		{name: "S2 --vlek", args: []string{s2, "--vlek", s2VLEK, "--now", "2025-06-01T00:00:00Z"}},
		{name: "S2 --vlek after it expired", args: []string{s2, "--vlek", s2VLEK, "--now", "2026-01-01T00:00:00Z"}, wantCode: 1, wantStderr: "rejected (expired): VLEK certificate"},
		{name: "S2 VLEK given as --vcek", args: []string{s2, "--vcek", s2VLEK, "--now", "2025-06-01T00:00:00Z"}, wantStderr: "the --vcek certificate is a VLEK"},
		{name: "S1 VCEK given as --vlek", args: []string{s1, "--vlek", s1VCEK, "--now", "2025-06-01T00:00:00Z"}, wantStderr: "the --vlek certificate is a VCEK", signer: "vcek"},
		{name: "S11 --vlek, not its signer", args: []string{s11, "--vlek", s11VLEK, "--now", "2024-01-01T00:00:00Z"}, wantCode: 1, wantStderr: "rejected (signature): "},
		{name: "S12 --vlek bound to the AK digest", args: []string{s12, "--vlek", s12VLEK, "--now", "2025-06-01T00:00:00Z", "--report-data", akDigest}},
		{name: "S10 as stored --vcek", args: []string{s10, "--vcek", s10VCEK, "--now", "2025-06-01T00:00:00Z"}, wantCode: 1, wantStderr: "rejected (malformed): parsing SEV-SNP certificate table"},
		{name: "S12 --vlek, other report data", args: []string{s12, "--vlek", s12VLEK, "--now", "2025-06-01T00:00:00Z", "--report-data", "123abc"}, wantCode: 1, wantStderr: "rejected (binding): "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := runCLI(t, append([]string{"attest", "verify"}, tt.args...)...)
			if code != tt.wantCode {
				t.Fatalf("exit %d, want %d; stderr: %s", code, tt.wantCode, stderr)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr %q does not contain %q", stderr, tt.wantStderr)
			}
			if signer := cmp.Or(tt.signer, "vlek"); code == 0 && !strings.Contains(stdout, `"signer": "`+signer+`"`) {
				t.Errorf("claims do not name a VLEK signer:\n%s", stdout)
			}
		})
	}
}

func TestAttestVerifyProductContradiction(t *testing.T) {
	// S2 is a version 3 report, which names its product (Milan) itself.
	const trustee = "confidential-containers_trustee/deps/verifier/test_data/snp/"
	s2, s2VLEK := realEvidence(t, trustee+"test-vlek-report.bin"), realEvidence(t, trustee+"test-vlek.der")
	_, stderr, code := runCLI(t, "attest", "verify", s2, "--vlek", s2VLEK, "--product", "Genoa", "--now", "2025-06-01T00:00:00Z")
	if want := "rejected (chain): the report is from a Milan machine (CPUID 0x00a00f11), not Genoa as expected"; code != 1 || !strings.Contains(stderr, want) {
		t.Errorf("S2 --product Genoa: exit %d, stderr %q; want %q", code, stderr, want)
	}
	if _, stderr, code := runCLI(t, "attest", "verify", s2, "--vlek", s2VLEK, "--product", "Milan", "--now", "2025-06-01T00:00:00Z"); code != 0 {
		t.Errorf("S2 --product Milan: exit %d, stderr %q", code, stderr)
	}
}
