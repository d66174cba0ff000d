package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// runCLI runs lethectl in-process with args and returns its stdout, stderr and exit code.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errOut)
	err := root.ExecuteContext(t.Context())
	if ee, ok := errors.AsType[*exitError](err); ok {
		return out.String(), errOut.String(), ee.code
	}
	if err != nil {
		errOut.WriteString(err.Error())
		return out.String(), errOut.String(), 2
	}
	return out.String(), errOut.String(), 0
}

// tamperEvidence writes a copy of the evidence JSON at src with one byte of its raw bytes flipped.
func tamperEvidence(t *testing.T, src, dst string, offset int) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := attest.ParseEvidence(b)
	if err != nil {
		t.Fatal(err)
	}
	ev.Raw[offset] ^= 1
	b, err = json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

const (
	testRealSNPReport = "../../attest/testdata/snp/milan-v2-report.bin"
	testRealSNPVCEK   = "../../attest/testdata/snp/collateral/kdsintf.amd.com/vcek/v1/Milan/3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a1936776b564ea464cdce40c05f63c9b610c5068b006b5d@blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"
)

func TestAttestCommands(t *testing.T) {
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots")
	path := func(name string) string { return filepath.Join(dir, name) }
	measurement := strings.Repeat("ab", 48)

	type platformCase struct {
		platform string
		extra    []string
		// measurementClaim is where the measurement appears in the claims JSON.
		measurementClaim func(map[string]any) any
	}
	platforms := []platformCase{
		{
			platform:         "emulated-sev-snp",
			extra:            []string{"--tcb", "bl=3,tee=0,snp=8,ucode=115"},
			measurementClaim: func(m map[string]any) any { return m["snp"].(map[string]any)["measurement"] },
		},
	}
	// Emulated TDX joins once the platform exists.
	if _, err := emulate.New(attest.PlatformEmulatedTDX, emulate.Options{}); err == nil {
		platforms = append(platforms, platformCase{
			platform:         "emulated-tdx",
			extra:            []string{"--tee-tcb-svn", "0601020000000000" + strings.Repeat("00", 8)},
			measurementClaim: func(m map[string]any) any { return m["tdx"].(map[string]any)["mrTd"] },
		})
	} else {
		t.Logf("emulated-tdx not available, not tested: %v", err)
	}

	for _, pc := range platforms {
		t.Run(pc.platform, func(t *testing.T) {
			ev := path(pc.platform + ".json")
			raw := path(pc.platform + ".bin")
			args := append([]string{"attest", "emulate", "--platform", pc.platform, "--report-data", "c0ffee",
				"--measurement", measurement, "--roots-out", roots, "--out", ev, "--raw-out", raw}, pc.extra...)
			if _, stderr, code := runCLI(t, args...); code != 0 {
				t.Fatalf("emulate: exit %d: %s", code, stderr)
			}
			// A second call with the same --roots-out signs as the same platform.
			ev2 := path(pc.platform + "-2.json")
			if _, stderr, code := runCLI(t, "attest", "emulate", "--platform", pc.platform, "--report-data", "0a", "--roots-out", roots, "--out", ev2); code != 0 {
				t.Fatalf("second emulate: exit %d: %s", code, stderr)
			}
			tampered := path(pc.platform + "-tampered.json")
			tamperEvidence(t, ev, tampered, 0x90+5)

			tests := []struct {
				name       string
				args       []string
				wantCode   int
				wantStderr string
			}{
				{name: "verify", args: []string{"attest", "verify", ev, "--trust-roots", roots, "--report-data", "c0ffee"}},
				{name: "verify second evidence", args: []string{"attest", "verify", ev2, "--trust-roots", roots, "--report-data", "0a"}},
				{name: "binding not checked", args: []string{"attest", "verify", ev, "--trust-roots", roots}, wantStderr: "binding was not checked"},
				{name: "raw bytes", args: []string{"attest", "verify", raw, "--platform", pc.platform, "--trust-roots", roots, "--report-data", "c0ffee"}},
				{name: "tampered", args: []string{"attest", "verify", tampered, "--trust-roots", roots, "--report-data", "c0ffee"}, wantCode: 1, wantStderr: "rejected (signature): "},
				{name: "wrong report data", args: []string{"attest", "verify", ev, "--trust-roots", roots, "--report-data", "c0ffef"}, wantCode: 1, wantStderr: "rejected (binding): "},
				{name: "no emulator roots", args: []string{"attest", "verify", ev, "--report-data", "c0ffee"}, wantCode: 1, wantStderr: "rejected (platform): "},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					stdout, stderr, code := runCLI(t, tt.args...)
					if code != tt.wantCode {
						t.Fatalf("exit %d, want %d; stderr: %s", code, tt.wantCode, stderr)
					}
					if !strings.Contains(stderr, tt.wantStderr) {
						t.Errorf("stderr %q does not contain %q", stderr, tt.wantStderr)
					}
					if code != 0 {
						if stdout != "" {
							t.Errorf("rejected evidence printed claims: %s", stdout)
						}
						return
					}
					var claims map[string]any
					if err := json.Unmarshal([]byte(stdout), &claims); err != nil {
						t.Fatalf("claims are not JSON: %v\n%s", err, stdout)
					}
					if diff := cmp.Diff(pc.platform, claims["platform"]); diff != "" {
						t.Errorf("platform (-want +got):\n%s", diff)
					}
					if tt.name != "verify second evidence" {
						if diff := cmp.Diff(measurement, pc.measurementClaim(claims)); diff != "" {
							t.Errorf("measurement (-want +got):\n%s", diff)
						}
					}
				})
			}
		})
	}
}

func TestAttestVerifyRealSNP(t *testing.T) {
	collateral := "../../attest/testdata/snp/collateral"
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{name: "VCEK from the collateral cache", args: []string{testRealSNPReport, "--collateral", collateral, "--now", "2024-03-01T00:00:00Z", "--report-data", "0102030405"}},
		{name: "VCEK given", args: []string{testRealSNPReport, "--vcek", testRealSNPVCEK, "--product", "Milan", "--now", "2024-03-01T00:00:00Z", "--report-data", "0102030405"}},
		{name: "VCEK expired", args: []string{testRealSNPReport, "--vcek", testRealSNPVCEK, "--now", "2030-01-01T00:00:00Z"}, wantCode: 1, wantStderr: "rejected (expired): "},
		{name: "no VCEK", args: []string{testRealSNPReport, "--now", "2024-03-01T00:00:00Z"}, wantCode: 1, wantStderr: "rejected (collateral): "},
		{name: "real report named emulated", args: []string{testRealSNPReport, "--platform", "emulated-tdx"}, wantCode: 2, wantStderr: "raw"},
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
			if code == 0 && !strings.Contains(stdout, `"product": "Milan"`) {
				t.Errorf("claims do not name Milan:\n%s", stdout)
			}
		})
	}
}

func TestAttestHelp(t *testing.T) {
	for _, args := range [][]string{{"attest"}, {"attest", "emulate"}, {"attest", "verify"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			stdout, stderr, code := runCLI(t, append(args, "--help")...)
			if code != 0 {
				t.Fatalf("--help: exit %d: %s", code, stderr)
			}
			if !strings.Contains(stdout, "Examples:") {
				t.Errorf("%s --help has no example:\n%s", strings.Join(args, " "), stdout)
			}
		})
	}
}

func TestAttestEmulateBadFlags(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "ev.json")
	tests := map[string][]string{
		"real platform":        {"--platform", "sev-snp", "--report-data", "00", "--out", out},
		"report data too long": {"--platform", "emulated-sev-snp", "--report-data", strings.Repeat("00", 65), "--out", out},
		"short measurement":    {"--platform", "emulated-sev-snp", "--report-data", "00", "--measurement", "abcd", "--out", out},
		"bad TCB":              {"--platform", "emulated-sev-snp", "--report-data", "00", "--tcb", "bl=3,foo=1", "--out", out},
		"TCB on TDX":           {"--platform", "emulated-tdx", "--report-data", "00", "--tcb", "bl=3", "--out", out},
		"TEE TCB SVN on SNP":   {"--platform", "emulated-sev-snp", "--report-data", "00", "--tee-tcb-svn", strings.Repeat("00", 16), "--out", out},
		"no out":               {"--platform", "emulated-sev-snp", "--report-data", "00"},
	}
	for name, args := range tests {
		t.Run(name, func(t *testing.T) {
			if _, _, code := runCLI(t, append([]string{"attest", "emulate"}, args...)...); code == 0 {
				t.Errorf("emulate %v succeeded, want an error", args)
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("emulate %v wrote %s", args, out)
			}
		})
	}
}
