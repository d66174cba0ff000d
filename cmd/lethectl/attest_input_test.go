package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-sev-guest/abi"

	"github.com/lethe-cc/lethe/attest"
)

// hclReport wraps an SEV-SNP report in an Azure HCL report with the given runtime data, laid
// out as an Azure CVM's paravisor lays it out.
func hclReport(report, runtime []byte) []byte {
	le := binary.LittleEndian
	b := []byte("HCLA")
	b = le.AppendUint32(b, 1)
	b = le.AppendUint32(b, uint32(0x20+len(report)+20+len(runtime)))
	b = le.AppendUint32(b, 2)
	b = append(b, make([]byte, 16)...)
	b = append(b, report...)
	for _, v := range []uint32{uint32(20 + len(runtime)), 1, 2, 1, uint32(len(runtime))} {
		b = le.AppendUint32(b, v)
	}
	return append(append(b, runtime...), make([]byte, 32)...)
}

// TestAttestVerifyAzureHCL verifies an emulated SEV-SNP report wrapped as an Azure CVM wraps it,
// raw and as Azure evidence JSON.
func TestAttestVerifyAzureHCL(t *testing.T) {
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	roots := path("roots")
	runtime := []byte(`{"keys":[{"kid":"HCLAkPub","kty":"RSA"}],"vm-configuration":{"secure-boot":true},"user-data":"c0ffee"}`)
	digest := sha256.Sum256(runtime)
	if _, stderr, code := runCLI(t, "attest", "emulate", "--platform", "emulated-sev-snp", "--report-data", hex.EncodeToString(digest[:]),
		"--roots-out", roots, "--out", path("ev.json"), "--raw-out", path("raw.bin")); code != 0 {
		t.Fatalf("emulate: exit %d: %s", code, stderr)
	}
	raw, err := os.ReadFile(path("raw.bin"))
	if err != nil {
		t.Fatal(err)
	}
	var table abi.CertTable
	if err := table.Unmarshal(raw[abi.ReportSize:]); err != nil {
		t.Fatal(err)
	}
	var vcek []byte
	for _, e := range table.Entries {
		if e.GUID.String() == abi.VcekGUID {
			vcek = e.RawCert
		}
	}
	hcl := hclReport(raw[:abi.ReportSize], runtime)
	write := func(name string, b []byte) string {
		if err := os.WriteFile(path(name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return path(name)
	}
	write("vcek.der", vcek)
	ints := make([]string, len(hcl))
	for i, c := range hcl {
		ints[i] = fmt.Sprint(c)
	}
	vcekPEM, _ := json.Marshal(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: vcek})))
	write("azure.json", []byte(`{"quote":{},"report":[`+strings.Join(ints, ",")+`],"vcek":`+string(vcekPEM)+`}`))
	forged := append([]byte(nil), hcl...)
	copy(forged[strings.Index(string(forged), "c0ffee"):], "c0ffef")
	write("forged.bin", forged)
	write("hcl.bin", hcl)

	emu := []string{"--platform", "emulated-sev-snp", "--trust-roots", roots}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{name: "raw HCL report", args: []string{path("hcl.bin"), "--vcek", path("vcek.der")}, wantStderr: "not usable as Lethe evidence"},
		{name: "Azure evidence JSON", args: []string{path("azure.json")}, wantStderr: "not usable as Lethe evidence"},
		{name: "user-data as --report-data", args: []string{path("hcl.bin"), "--vcek", path("vcek.der"), "--report-data", "c0ffee"}},
		{name: "other user-data", args: []string{path("hcl.bin"), "--vcek", path("vcek.der"), "--report-data", "c0ffef"}, wantCode: 1, wantStderr: "rejected (binding): HCL runtime data user-data c0ffee"},
		{name: "runtime data changed", args: []string{path("forged.bin"), "--vcek", path("vcek.der")}, wantCode: 1, wantStderr: "rejected (binding): report data"},
		{name: "HCL report as Lethe evidence", args: []string{path("hcl.bin"), "--platform", "emulated-tdx"}, wantCode: 2, wantStderr: "wraps an SEV-SNP report"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"attest", "verify"}, tt.args...)
			if tt.name != "HCL report as Lethe evidence" {
				args = append(args, emu...)
			}
			stdout, stderr, code := runCLI(t, args...)
			if code != tt.wantCode {
				t.Fatalf("exit %d, want %d; stderr: %s", code, tt.wantCode, stderr)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr %q does not contain %q", stderr, tt.wantStderr)
			}
			if code != 0 {
				return
			}
			var got struct {
				ReportData string `json:"reportData"`
				Azure      struct {
					LetheBinding bool                    `json:"letheBinding"`
					Runtime      attest.AzureRuntimeData `json:"runtimeData"`
				} `json:"azure"`
			}
			if err := json.Unmarshal([]byte(stdout), &got); err != nil {
				t.Fatalf("claims are not JSON: %v\n%s", err, stdout)
			}
			if got.Azure.LetheBinding || got.Azure.Runtime.UserData.String() != "c0ffee" || !strings.HasPrefix(got.ReportData, hex.EncodeToString(digest[:])) {
				t.Errorf("claims: %s", stdout)
			}
		})
	}
}

func TestAttestVerifyCheckRevocations(t *testing.T) {
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots")
	ev := filepath.Join(dir, "ev.json")
	if _, stderr, code := runCLI(t, "attest", "emulate", "--platform", "emulated-sev-snp", "--report-data", "00", "--roots-out", roots, "--out", ev); code != 0 {
		t.Fatalf("emulate: exit %d: %s", code, stderr)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{name: "emulator's CRLs", args: []string{ev, "--trust-roots", roots, "--check-revocations"}},
		{name: "real report, no CRL", args: []string{testRealSNPReport, "--vcek", testRealSNPVCEK, "--now", "2024-03-01T00:00:00Z", "--check-revocations"}, wantCode: 1, wantStderr: "rejected (collateral): "},
		{name: "real report, revocation not asked", args: []string{testRealSNPReport, "--vcek", testRealSNPVCEK, "--now", "2024-03-01T00:00:00Z"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := runCLI(t, append([]string{"attest", "verify"}, tt.args...)...)
			if code != tt.wantCode {
				t.Fatalf("exit %d, want %d; stderr: %s", code, tt.wantCode, stderr)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr %q does not contain %q", stderr, tt.wantStderr)
			}
		})
	}
}

func TestReadAnyEvidenceTDXQuoteVersions(t *testing.T) {
	for _, version := range []uint16{4, 5} {
		b := make([]byte, 1024)
		binary.LittleEndian.PutUint16(b[0:], version)
		binary.LittleEndian.PutUint16(b[2:], 2)
		binary.LittleEndian.PutUint32(b[4:], 0x81)
		ev, azure, err := readAnyEvidence(b, "")
		if err != nil || ev.Platform != attest.PlatformTDX || azure != nil {
			t.Errorf("quote v%d: got %v, %v, %v; want raw TDX evidence", version, ev, azure, err)
		}
	}
	b := make([]byte, 1024)
	binary.LittleEndian.PutUint16(b[0:], 3)
	binary.LittleEndian.PutUint32(b[4:], 0x81)
	if _, _, err := readAnyEvidence(b, ""); err == nil {
		t.Error("quote v3 accepted")
	}
}
