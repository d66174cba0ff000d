package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/internal/evidencetest"
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

// TestTDXWithoutCollateralRefused plays a destination that presents a genuine TDX quote (a real
// capture) to a keybroker that holds no Intel collateral: the keybroker's verifier refuses it
// (collateral), with or without revocation checks, and never passes it on its signatures and
// PCK chain alone as `lethectl attest verify --chain-only` may (attest.Config.TDXChainOnly,
// which no keybroker flag sets).
func TestTDXWithoutCollateralRefused(t *testing.T) {
	ev := &attest.Evidence{Platform: attest.PlatformTDX, Raw: evidencetest.Read(t, "Phala-Network_dcap-qvl/sample/tdx_quote")}
	at := func() time.Time { return time.Date(2025, 7, 1, 0, 0, 0, 0, time.UTC) }
	chainOnly, err := attest.NewVerifier(attest.Config{TDXChainOnly: true, Now: at})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := chainOnly.Verify(t.Context(), ev, attest.Expectation{SkipReportData: true}); err != nil {
		t.Fatalf("the quote does not verify even by its chain: %v", err)
	}
	for name, args := range map[string][]string{
		"default":                  nil,
		"--check-revocation=false": {"--check-revocation=false"},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := parseFlags(append([]string{"--dev", "--state-dir", t.TempDir()}, args...))
			if err != nil {
				t.Fatal(err)
			}
			v, err := newVerifier(c, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			_, err = v.Verify(t.Context(), ev, attest.Expectation{SkipReportData: true})
			if got := attest.ReasonOf(err); got != attest.ReasonCollateral {
				t.Errorf("the keybroker's verifier: reason %q (%v), want collateral", got, err)
			}
		})
	}
}
