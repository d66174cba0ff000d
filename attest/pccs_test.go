package attest_test

import (
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/attest"
)

// TestPCCSCollateralRefuses checks that PCCSCollateral refuses JSON that is not
// QuoteCollateralV3, rather than serving documents that would fail later for another reason.
func TestPCCSCollateralRefuses(t *testing.T) {
	const qe = `"qe_identity":"{\"id\":\"TD_QE\"}","qe_identity_signature":"00"`
	tests := map[string]struct {
		json, errHas string
	}{
		"not JSON":            {json: `tcb_info`, errHas: "invalid character"},
		"Lethe evidence JSON": {json: `{"platform":"tdx","raw":"AAAA"}`, errHas: "not QuoteCollateralV3"},
		"TCB info not JSON":   {json: `{"tcb_info":"{","tcb_info_signature":"00",` + qe + `}`, errHas: "tcb_info"},
		"FMSPC not hex":       {json: `{"tcb_info":"{\"fmspc\":\"B0C06FXX0000\"}","tcb_info_signature":"00",` + qe + `}`, errHas: "FMSPC"},
		"signature not hex":   {json: `{"tcb_info":"{\"fmspc\":\"B0C06F000000\"}","tcb_info_signature":"zz",` + qe + `}`, errHas: "signature"},
		"no issuer chain":     {json: `{"tcb_info":"{\"fmspc\":\"B0C06F000000\"}","tcb_info_signature":"00",` + qe + `}`, errHas: "no issuer chain"},
		"PCK CRL not a CRL":   {json: `{"tcb_info":"{\"fmspc\":\"B0C06F000000\"}","tcb_info_signature":"00","tcb_info_issuer_chain":"x","qe_identity_issuer_chain":"x",` + qe + `,"pck_crl":"3000"}`, errHas: "pck_crl"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			docs, err := attest.PCCSCollateral([]byte(tc.json))
			if err == nil || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("PCCSCollateral = %d documents, %v; want an error saying %q", len(docs), err, tc.errHas)
			}
		})
	}
}
