package attest_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/google/go-tdx-guest/pcs"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/evidencetest"
)

// Real TDX quotes and Intel PCS collateral captured by other projects are not part of the
// repository: these tests read them through package evidencetest (LETHE_EVIDENCE_DIR), laid out as <owner>_<repo>/<path in that repository>, and skip where
// it is absent, failing instead when CI=true.

const (
	dcapQVLSamples = "Phala-Network_dcap-qvl/sample/"
	trusteeTDX     = "confidential-containers_trustee/deps/verifier/test_data/"
)

func tdxCorpusFile(t testing.TB, rel string) []byte { return evidencetest.Read(t, rel) }

func pccsDocs(t testing.TB, rel string) map[string][]byte {
	t.Helper()
	docs, err := attest.PCCSCollateral(tdxCorpusFile(t, rel))
	if err != nil {
		t.Fatalf("PCCSCollateral(%s): %v", rel, err)
	}
	return docs
}

// pcsResponseDocs serves trustee's TCB info and QE identity, exact Intel PCS response bodies
// that were saved without their response headers, with the issuer chains Intel serves them
// with (the "Intel SGX TCB Signing" certificate and the root), taken from dcap-qvl's collateral.
func pcsResponseDocs(t testing.TB) map[string][]byte {
	t.Helper()
	var chains struct {
		TCB string `json:"tcb_info_issuer_chain"`
		QE  string `json:"qe_identity_issuer_chain"`
	}
	if err := json.Unmarshal(tdxCorpusFile(t, dcapQVLSamples+"tdx_quote_collateral.json"), &chains); err != nil {
		t.Fatal(err)
	}
	headers := func(name, chain string) []byte {
		b, err := json.Marshal(map[string]map[string][]string{"headers": {name: {url.QueryEscape(chain)}}})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tcbURL := pcs.TcbInfoURL("00a06d080000")
	return map[string][]byte{
		tcbURL:                                  tdxCorpusFile(t, trusteeTDX+"tcbInfo.json"),
		tcbURL + attest.CollateralHeadersSuffix: headers("Tcb-Info-Issuer-Chain", chains.TCB),
		pcs.QeIdentityURL():                     tdxCorpusFile(t, trusteeTDX+"enclaveIdentity.json"),
		pcs.QeIdentityURL() + attest.CollateralHeadersSuffix: headers("Sgx-Enclave-Identity-Issuer-Chain", chains.QE),
	}
}

func date(s string) func() time.Time {
	t, err := time.Parse(time.DateOnly, s)
	if err != nil {
		panic(err)
	}
	return at(t)
}

// TestVerifyTDXCorpus verifies real quotes v4 and v5 against the real Intel PCS collateral
// captured beside them, with the outcomes their sources and an independent check established
// (SOURCES.md of the corpus).
func TestVerifyTDXCorpus(t *testing.T) {
	flip := func(b []byte, off int) []byte {
		b = bytes.Clone(b)
		b[off] ^= 0x01
		return b
	}
	// tamper changes one character of the signed TCB info: its signature no longer verifies.
	tamper := func(docs map[string][]byte) map[string][]byte {
		out := map[string][]byte{}
		for k, v := range docs {
			if strings.Contains(k, "/tcb?") && !strings.HasSuffix(k, attest.CollateralHeadersSuffix) {
				v = bytes.Replace(v, []byte(`"tcbEvaluationDataNumber":17`), []byte(`"tcbEvaluationDataNumber":18`), 1)
			}
			out[k] = v
		}
		return out
	}
	const (
		v4ReportData = 0x30 + 0x208     // header, then the TD report's REPORT_DATA
		v5ReportData = 0x30 + 6 + 0x208 // header, body descriptor, then REPORT_DATA
	)
	s18 := func(t testing.TB) []byte { return tdxCorpusFile(t, dcapQVLSamples+"tdx_quote") }
	s19 := func(t testing.TB) []byte { return tdxCorpusFile(t, dcapQVLSamples+"tdx_quote_outdated") }
	s7 := func(t testing.TB) []byte { return tdxCorpusFile(t, trusteeTDX+"tdx_quote_6.dat") }
	s6 := func(t testing.TB) []byte { return tdxCorpusFile(t, trusteeTDX+"tdx_quote_5.dat") }
	s18Docs := func(t testing.TB) map[string][]byte { return pccsDocs(t, dcapQVLSamples+"tdx_quote_collateral.json") }
	s19Docs := func(t testing.TB) map[string][]byte {
		return pccsDocs(t, dcapQVLSamples+"tdx_quote_outdated_collateral.json")
	}

	tests := map[string]struct {
		quote       func(testing.TB) []byte
		docs        func(testing.TB) map[string][]byte
		now         string
		revocations bool
		reason      attest.Reason
		errHas      string
		// want are claims of a quote that verifies.
		want map[string]string
	}{
		"S18 v4 UpToDate": {quote: s18, docs: s18Docs, now: "2025-07-01",
			want: map[string]string{"version": "4", "fmspc": "b0c06f000000", "tcbStatus": "UpToDate", "debug": "false", "teeTcbSvn2": ""}},
		"S18 v4 UpToDate, revocations checked": {quote: s18, docs: s18Docs, now: "2025-07-01", revocations: true,
			want: map[string]string{"version": "4", "fmspc": "b0c06f000000", "tcbStatus": "UpToDate", "debug": "false", "teeTcbSvn2": ""}},
		"S18 after nextUpdate":         {quote: s18, docs: s18Docs, now: "2025-08-01", reason: attest.ReasonExpired, errHas: "tcbInfo has expired"},
		"S18 report data bit flipped":  {quote: func(t testing.TB) []byte { return flip(s18(t), v4ReportData) }, docs: s18Docs, now: "2025-07-01", reason: attest.ReasonSignature},
		"S18 TCB info tampered":        {quote: s18, docs: func(t testing.TB) map[string][]byte { return tamper(s18Docs(t)) }, now: "2025-07-01", reason: attest.ReasonSignature, errHas: "TCB info signature"},
		"S18 with another FMSPC's TCB": {quote: s18, docs: s19Docs, now: "2026-03-01", reason: attest.ReasonCollateral},
		"S7 v4 OutOfDate":              {quote: s7, docs: pcsResponseDocs, now: "2025-11-01", reason: attest.ReasonTCB, errHas: `found "OutOfDate"`},
		"S19 v5 no TCB level":          {quote: s19, docs: s19Docs, now: "2026-03-01", reason: attest.ReasonTCB, errHas: "no matching TCB level"},
		"S19 v5, revocations checked":  {quote: s19, docs: s19Docs, now: "2026-03-01", revocations: true, reason: attest.ReasonTCB, errHas: "no matching TCB level"},
		"S19 v5 report data flipped":   {quote: func(t testing.TB) []byte { return flip(s19(t), v5ReportData) }, docs: s19Docs, now: "2026-03-01", reason: attest.ReasonSignature},
		"S19 v5 after nextUpdate":      {quote: s19, docs: s19Docs, now: "2026-04-01", reason: attest.ReasonExpired, errHas: "tcbInfo has expired"},
		// The same FMSPC as S19, on an older TCB still: CPUSVN 01010202030100… reaches no level.
		"S6 v5 with S19's collateral": {quote: s6, docs: s19Docs, now: "2026-03-01", reason: attest.ReasonTCB, errHas: "no matching TCB level"},
		"S6 v5 without collateral":    {quote: s6, now: "2025-06-01", reason: attest.ReasonCollateral},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			cfg := attest.Config{Now: date(tc.now), CheckRevocations: tc.revocations}
			if tc.docs != nil {
				cfg.TDXCollateral = tc.docs(t)
			}
			claims, err := tdxVerifier(t, cfg).Verify(t.Context(), &attest.Evidence{Platform: attest.PlatformTDX, Raw: tc.quote(t)}, attest.Expectation{SkipReportData: true})
			if got := attest.ReasonOf(err); got != tc.reason {
				t.Fatalf("Verify: reason %q (%v), want %q", got, err, tc.reason)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tc.errHas) {
					t.Errorf("Verify: %v, want an error saying %q", err, tc.errHas)
				}
				return
			}
			got := map[string]string{
				"version":    fmt.Sprint(claims.TDX.QuoteVersion),
				"fmspc":      claims.TDX.FMSPC.String(),
				"tcbStatus":  claims.TDX.TCBStatus,
				"debug":      fmt.Sprint(claims.TDX.Debug),
				"teeTcbSvn2": claims.TDX.TEETCBSVN2.String(),
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("claims (-want +got):\n%s", diff)
			}
		})
	}
}

// TestPCCSCollateralCorpus checks the documents PCCSCollateral makes of real QuoteCollateralV3
// JSON: served at the URLs Lethe asks for, FMSPC in lower case, with issuer chains.
func TestPCCSCollateralCorpus(t *testing.T) {
	docs := pccsDocs(t, dcapQVLSamples+"tdx_quote_collateral.json")
	var got []string
	for k := range docs {
		got = append(got, k)
	}
	tcb := pcs.TcbInfoURL("b0c06f000000")
	crl := pcs.PckCrlURL("platform")
	const root = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
	want := []string{tcb, tcb + attest.CollateralHeadersSuffix, pcs.QeIdentityURL(), pcs.QeIdentityURL() + attest.CollateralHeadersSuffix, crl, crl + attest.CollateralHeadersSuffix, root}
	less := func(a, b string) bool { return a < b }
	if diff := cmp.Diff(want, got, cmpopts.SortSlices(less)); diff != "" {
		t.Errorf("documents (-want +got):\n%s", diff)
	}
}
