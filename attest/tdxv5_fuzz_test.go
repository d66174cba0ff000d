package attest

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/internal/evidencetest"
)

// FuzzTDXQuoteV5 feeds arbitrary bytes to the quote v5 parser and through the verifier: neither
// may panic, every failure must be a *RejectError with a reason, and a parsed quote's fields
// must lie within the bytes given. The seeds are quotes built by hand in the v5 layout (both
// body types) and their broken variants, and the corpus's real quotes v5 where they are here
// (they are never part of the repository).
func FuzzTDXQuoteV5(f *testing.F) {
	seeds := [][]byte{tdxHandBuiltV5(tdxBodyTypeTDReport15), tdxHandBuiltV5(tdxBodyTypeTDReport10)}
	dir := evidencetest.Dir()
	for _, rel := range []string{tdxQuote5, "Phala-Network_dcap-qvl/sample/tdx_quote_outdated"} {
		if b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(rel))); err == nil {
			seeds = append(seeds, b)
		}
	}
	for _, q := range seeds {
		f.Add(q)
		f.Add(q[:len(q)/2])
		f.Add(q[:tdxV5SignedSize+4])
		f.Add(tdxWithU16(q, 0x32, 0xffff))
		f.Add(append(bytes.Clone(q), 0, 1, 2))
	}
	f.Add([]byte{5, 0, 2, 0, 0x81, 0, 0, 0})

	v, err := NewVerifier(Config{
		CollateralDir: "testdata/tdx-collateral",
		Now:           func() time.Time { return time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC) },
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		if q, err := parseTDXQuoteV5(raw); err == nil {
			if len(q.signed) > len(raw) || len(q.body.reportData) != ReportDataSize || len(q.qeReport) != tdxQEReportSize {
				t.Fatalf("parsed quote of %d bytes: signed %d bytes, report data %d, QE report %d", len(raw), len(q.signed), len(q.body.reportData), len(q.qeReport))
			}
			_, _ = tdxValidationQuote(raw)
		} else if ReasonOf(err) != ReasonMalformed {
			t.Fatalf("parseTDXQuoteV5: %v is not a malformed rejection", err)
		}
		if _, err := v.Verify(t.Context(), &Evidence{Platform: PlatformTDX, Raw: raw}, Expectation{SkipReportData: true}); ReasonOf(err) == "" {
			t.Fatalf("Verify: %v, want a rejection with a reason", err)
		}
	})
}
