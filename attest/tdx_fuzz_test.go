package attest_test

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/lethe-cc/lethe/attest"
)

// FuzzTDXQuote feeds arbitrary bytes as a TDX quote, real and emulated, through the verifier:
// parsing (go-tdx-guest's abi plus Lethe's PCK chain and SGX extension reading) and
// verification must never panic, and every failure must be a *RejectError with a reason. The
// seed corpus (a real quote, an emulated one, and broken variants of both) runs in the normal
// test suite.
func FuzzTDXQuote(f *testing.F) {
	real, err := os.ReadFile(realTDXQuote)
	if err != nil {
		f.Fatal(err)
	}
	p := tdxPlatform(f, tdxBase)
	emulated := tdxEvidence(f, p).Raw
	for _, q := range [][]byte{real, emulated} {
		f.Add(q)
		f.Add(q[:len(q)/2])
		f.Add(q[:0x3fc])
		f.Add(inconsistentSizes(bytes.Clone(q)))
		f.Add(append(bytes.Clone(q), 0, 1, 2))
	}
	f.Add([]byte{})
	f.Add([]byte{4, 0, 2, 0, 0x81, 0, 0, 0})

	verifiers := map[attest.Platform]*attest.Verifier{
		attest.PlatformTDX:         tdxVerifier(f, attest.Config{CollateralDir: realTDXCollateral, Now: at(realTDXTime)}),
		attest.PlatformEmulatedTDX: tdxVerifier(f, attest.Config{Roots: []attest.Roots{p.Roots()}, CheckRevocations: true}),
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		for platform, v := range verifiers {
			claims, err := v.Verify(t.Context(), &attest.Evidence{Platform: platform, Raw: raw}, attest.Expectation{SkipReportData: true})
			if err != nil {
				re, ok := errors.AsType[*attest.RejectError](err)
				if !ok || re.Reason == "" {
					t.Fatalf("%v: Verify error %v is not a *RejectError with a reason", platform, err)
				}
				continue
			}
			if claims.TDX == nil || len(claims.ReportData) != attest.ReportDataSize {
				t.Fatalf("%v: verified claims %+v lack TDX claims or report data", platform, claims)
			}
			// Verified claims must be checkable without panicking either.
			_ = claims.Check(attest.Requirements{TDX: attest.TDXRequirements{MinimumTEETCBSVN: make([]byte, 16), MRTDs: [][]byte{make([]byte, 48)}}})
		}
	})
}
