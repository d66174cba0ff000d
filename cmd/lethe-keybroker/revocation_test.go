package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// TestRevocationCheckedByDefault wires the verifier as the keybroker does, with the roots of an
// emulator whose VCEK was revoked: by default the evidence is refused as revoked, silently
// accepted only with --check-revocation=false, which the log and /readyz then warn about. A
// mistyped LETHE_CHECK_REVOCATION never turns the check off: the keybroker refuses to start.
func TestRevocationCheckedByDefault(t *testing.T) {
	dir := t.TempDir()
	p, err := emulate.Open(dir, attest.PlatformEmulatedSEVSNP, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := p.Attest(t.Context(), [attest.ReportDataSize]byte{1})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Revoke(); err != nil {
		t.Fatal(err)
	}
	if err := p.Save(dir); err != nil {
		t.Fatal(err)
	}
	ev := &attest.Evidence{Platform: attest.PlatformEmulatedSEVSNP, Raw: raw}
	base := []string{"--dev", "--state-dir", t.TempDir(), "--trust-roots", dir, "--allow-emulated"}
	tests := map[string]struct {
		args   []string
		env    string
		reason attest.Reason
		warned bool
		badEnv bool
	}{
		"default":                   {reason: attest.ReasonRevoked},
		"--check-revocation=false":  {args: []string{"--check-revocation=false"}, warned: true},
		"LETHE_CHECK_REVOCATION=0":  {env: "0", warned: true},
		"LETHE_CHECK_REVOCATION=no": {env: "no", badEnv: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			t.Setenv("LETHE_CHECK_REVOCATION", tc.env)
			c, err := parseFlags(append(append([]string{}, base...), tc.args...))
			if tc.badEnv {
				if err == nil || !strings.Contains(err.Error(), "LETHE_CHECK_REVOCATION") {
					t.Errorf("err = %v, want one naming LETHE_CHECK_REVOCATION", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			v, err := newVerifier(c, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			_, err = v.Verify(t.Context(), ev, attest.Expectation{ReportData: []byte{1}})
			if got := attest.ReasonOf(err); got != tc.reason {
				t.Errorf("Verify: reason %q (%v), want %q", got, err, tc.reason)
			}
			logged := strings.Contains(logs.String(), "Not checking revocation")
			readyz := len(verifierWarnings(c)) > 0
			if logged != tc.warned || readyz != tc.warned {
				t.Errorf("warned in the log %v, in /readyz %v; want %v", logged, readyz, tc.warned)
			}
		})
	}
}
