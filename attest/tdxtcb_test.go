package attest

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/google/go-tdx-guest/pcs"
)

// TestTDXTCBStatus applies Intel's TCB info v3 and QE identity v2 rules to a platform, as
// Intel PCS writes them today: hex in upper case.
func TestTDXTCBStatus(t *testing.T) {
	tcbInfo := `{"id":"TDX","version":3,"issueDate":"2025-06-19T10:16:03Z","nextUpdate":"2025-07-19T10:16:03Z",
		"fmspc":"B0C06F000000","pceId":"0000",
		"tdxModule":{"mrsigner":"` + zeros48 + `","attributes":"0000000000000000","attributesMask":"FFFFFFFFFFFFFFFF"},
		"tdxModuleIdentities":[{"id":"TDX_03","mrsigner":"` + zeros48 + `","attributes":"0000000000000000","attributesMask":"FFFFFFFFFFFFFFFF",
			"tcbLevels":[{"tcb":{"isvsvn":3},"tcbDate":"2024-03-13T00:00:00Z","tcbStatus":"UpToDate"},
			             {"tcb":{"isvsvn":0},"tcbDate":"2023-08-09T00:00:00Z","tcbStatus":"OutOfDate"}]}],
		"tcbLevels":[
			{"tcb":{"sgxtcbcomponents":` + svns(2, 2) + `,"pcesvn":13,"tdxtcbcomponents":` + svns(5, 3) + `},"tcbDate":"2024-03-13T00:00:00Z","tcbStatus":"UpToDate"},
			{"tcb":{"sgxtcbcomponents":` + svns(1, 1) + `,"pcesvn":5,"tdxtcbcomponents":` + svns(0, 0) + `},"tcbDate":"2018-01-04T00:00:00Z","tcbStatus":"OutOfDate","advisoryIDs":["INTEL-SA-00001"]}]}`
	const qeIdentity = `{"id":"TD_QE","version":2,"miscselect":"00000000","miscselectMask":"FFFFFFFF",
		"attributes":"11000000000000000000000000000000","attributesMask":"FBFFFFFFFFFFFFFF0000000000000000",
		"mrsigner":"DC9E2A7C6F948F17474E34A7FC43ED030F7C1563F1BABDDF6340C82E0E54A8C5","isvprodid":2,
		"tcbLevels":[{"tcb":{"isvsvn":4},"tcbDate":"2024-03-13T00:00:00Z","tcbStatus":"UpToDate"}]}`
	var c tdxCollateral
	if err := json.Unmarshal([]byte(tcbInfo), &c.tcbInfo); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(qeIdentity), &c.qeIdentity); err != nil {
		t.Fatal(err)
	}
	qe := tdxQEReport{
		attributes: append([]byte{0x11}, make([]byte, 15)...),
		mrSigner:   []byte(c.qeIdentity.MRSigner), isvProdID: 2, isvSVN: 4,
	}
	upToDate := func() (tdxQuoteFacts, pcs.PckExtensions) {
		q := tdxQuoteFacts{teeTCBSVN: bytes.Repeat([]byte{3}, 16), mrSignerSEAM: make([]byte, 48), seamAttributes: make([]byte, 8), qe: qe}
		e := pcs.PckExtensions{FMSPC: "b0c06f000000", PCEID: "0000"}
		e.TCB.PCESvn = 13
		e.TCB.CPUSvnComponents = bytes.Repeat([]byte{2}, 16)
		return q, e
	}
	tests := map[string]struct {
		change func(*tdxQuoteFacts, *pcs.PckExtensions)
		reason Reason
		errHas string
	}{
		"UpToDate":                     {change: func(*tdxQuoteFacts, *pcs.PckExtensions) {}},
		"module version components":    {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.teeTCBSVN[0] = 4 }},
		"another FMSPC":                {change: func(_ *tdxQuoteFacts, e *pcs.PckExtensions) { e.FMSPC = "b0c06f000001" }, reason: ReasonCollateral},
		"another PCEID":                {change: func(_ *tdxQuoteFacts, e *pcs.PckExtensions) { e.PCEID = "0001" }, reason: ReasonCollateral},
		"platform OutOfDate":           {change: func(_ *tdxQuoteFacts, e *pcs.PckExtensions) { e.TCB.PCESvn = 12 }, reason: ReasonTCB, errHas: `found "OutOfDate" (advisories INTEL-SA-00001)`},
		"SGX component below all":      {change: func(_ *tdxQuoteFacts, e *pcs.PckExtensions) { e.TCB.CPUSvnComponents[7] = 0 }, reason: ReasonTCB, errHas: "no matching TCB level"},
		"TDX component below UpToDate": {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.teeTCBSVN[2] = 2 }, reason: ReasonTCB, errHas: `found "OutOfDate"`},
		"module SVN OutOfDate":         {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.teeTCBSVN[0] = 2 }, reason: ReasonTCB, errHas: `TDX module TDX_03 TCB level (2023-08-09T00:00:00Z) status is not "UpToDate", found "OutOfDate"`},
		"module not rated":             {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.teeTCBSVN[1] = 4 }, reason: ReasonTCB, errHas: "rates no TDX module TDX_04"},
		"module 0: all components":     {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.teeTCBSVN[1] = 0 }, reason: ReasonTCB, errHas: `found "OutOfDate"`},
		"module signed by another":     {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.mrSignerSEAM = bytes.Repeat([]byte{1}, 48) }, reason: ReasonChain},
		"QE of another signer":         {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.qe.mrSigner = make([]byte, 32) }, reason: ReasonChain},
		"QE debug attribute": {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) {
			q.qe.attributes = append([]byte{0x13}, make([]byte, 15)...)
		}, reason: ReasonChain},
		"QE ISVSVN below every level": {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) { q.qe.isvSVN = 3 }, reason: ReasonTCB, errHas: "no TCB level of QE identity"},
		"QE attribute outside the mask": {change: func(q *tdxQuoteFacts, _ *pcs.PckExtensions) {
			q.qe.attributes = append(append([]byte{0x11}, make([]byte, 7)...), bytes.Repeat([]byte{0xff}, 8)...)
		}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			q, e := upToDate()
			tc.change(&q, &e)
			status, err := tdxTCBStatus(&c, &q, &e)
			if got := ReasonOf(err); got != tc.reason {
				t.Fatalf("tdxTCBStatus: reason %q (%v), want %q", got, err, tc.reason)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tc.errHas) {
					t.Errorf("tdxTCBStatus: %v, want an error saying %q", err, tc.errHas)
				}
				return
			}
			if status != "UpToDate" {
				t.Errorf("status %q, want UpToDate", status)
			}
		})
	}
}

const zeros48 = "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"

// svns returns 16 TCB components as TCB info writes them: the first two (the TDX module's
// version, for TDX components) SVN first, the rest SVN rest.
func svns(first, rest byte) string {
	type component struct {
		SVN byte `json:"svn"`
	}
	cs := make([]component, 16)
	for i := range cs {
		cs[i].SVN = rest
		if i < 2 {
			cs[i].SVN = first
		}
	}
	b, _ := json.Marshal(cs)
	return string(b)
}
