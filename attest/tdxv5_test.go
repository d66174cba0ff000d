package attest

import (
	"bytes"
	"crypto/x509"
	"encoding/binary"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/evidencetest"
)

// tdxV5CorpusFile reads a real quote of the evidence corpus (package evidencetest).
func tdxV5CorpusFile(t testing.TB, rel string) []byte { return evidencetest.Read(t, rel) }

const (
	tdxQuote5 = "confidential-containers_trustee/deps/verifier/test_data/tdx_quote_5.dat"
	// Offsets in a quote v5 with a TD report 1.5 body.
	tdxV5BodyOffset   = 0x30 + 6
	tdxV5ReportData   = tdxV5BodyOffset + 0x208
	tdxV5SignedSize   = tdxV5BodyOffset + tdxTDReport15Size
	tdxV5QuoteSig     = tdxV5SignedSize + 4
	tdxV5QEReportData = tdxV5QuoteSig + 128 + 6 + 320
)

func intelPool(t testing.TB) *x509.CertPool {
	t.Helper()
	root, err := tdxParseRootPEM([]byte(intelSGXRootCA))
	if err != nil {
		t.Fatal(err)
	}
	return tdxPoolOf(root)
}

// TestVerifyTDXQuoteV5Chain verifies trustee's quote v5 (S6 of the corpus, for which no
// collateral was captured) up to its collateral: the PCK chain to Intel's root, the QE report's
// signature and data, the quote's signature. Each of them, broken, is refused for its reason.
func TestVerifyTDXQuoteV5Chain(t *testing.T) {
	raw := tdxV5CorpusFile(t, tdxQuote5)
	now := time.Date(2025, 6, 1, 0, 0, 0, 0, time.UTC)
	flip := func(off int) []byte {
		b := bytes.Clone(raw)
		b[off] ^= 0x01
		return b
	}
	tests := map[string]struct {
		raw    []byte
		now    time.Time
		reason Reason
	}{
		"verifies":                 {raw: raw, now: now},
		"report data flipped":      {raw: flip(tdxV5ReportData), now: now, reason: ReasonSignature},
		"body descriptor flipped":  {raw: flip(0x30 + 2), now: now, reason: ReasonMalformed},
		"quote signature flipped":  {raw: flip(tdxV5QuoteSig + 5), now: now, reason: ReasonSignature},
		"QE report data flipped":   {raw: flip(tdxV5QEReportData), now: now, reason: ReasonSignature},
		"attestation key flipped":  {raw: flip(tdxV5QuoteSig + 64 + 3), now: now, reason: ReasonSignature},
		"before the PCK is issued": {raw: raw, now: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), reason: ReasonExpired},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := func() error {
				q, err := parseTDXEvidence(tc.raw)
				if err != nil {
					return err
				}
				return verifyTDXQuoteV5(q.v5, q.chain, intelPool(t), tc.now)
			}()
			if got := ReasonOf(err); got != tc.reason {
				t.Fatalf("verifying: reason %q (%v), want %q", got, err, tc.reason)
			}
		})
	}

	// Against another root the chain does not verify.
	q, err := parseTDXEvidence(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyTDXQuoteV5(q.v5, q.chain, x509.NewCertPool(), now); ReasonOf(err) != ReasonChain {
		t.Errorf("verifying against no root: %v, want reason chain", err)
	}
}

// TestTDXQuoteV5Claims checks the claims of a quote v5 against its bytes, and that
// Claims.Check evaluates requirements on them through go-tdx-guest's validate.
func TestTDXQuoteV5Claims(t *testing.T) {
	raw := tdxV5CorpusFile(t, tdxQuote5)
	q, err := parseTDXEvidence(raw)
	if err != nil {
		t.Fatal(err)
	}
	c := q.claims(raw, []byte{0x90, 0xc0, 0x6f, 0, 0, 0}, tdxAcceptedStatus)
	body := raw[tdxV5BodyOffset : tdxV5BodyOffset+tdxTDReport15Size]
	got := map[string]string{
		"version":     HexBytes{byte(c.TDX.QuoteVersion)}.String(),
		"teeTcbSvn":   c.TDX.TEETCBSVN.String(),
		"mrTd":        c.TDX.MRTD.String(),
		"rtmr3":       c.TDX.RTMRs[3].String(),
		"reportData":  c.ReportData.String(),
		"teeTcbSvn2":  c.TDX.TEETCBSVN2.String(),
		"mrServiceTd": c.TDX.MRServiceTD.String(),
		"qeSvn":       HexBytes(binary.LittleEndian.AppendUint16(nil, c.TDX.QESVN)).String(),
	}
	want := map[string]string{
		"version":     "05",
		"teeTcbSvn":   HexBytes(body[0:16]).String(),
		"mrTd":        HexBytes(body[136:184]).String(),
		"rtmr3":       HexBytes(body[472:520]).String(),
		"reportData":  HexBytes(body[520:584]).String(),
		"teeTcbSvn2":  HexBytes(body[584:600]).String(),
		"mrServiceTd": HexBytes(body[600:648]).String(),
		"qeSvn":       HexBytes(raw[10:12]).String(),
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("claims (-want +got):\n%s", diff)
	}

	if err := c.Check(Requirements{TDX: TDXRequirements{AllowDebug: true, MRTDs: [][]byte{c.TDX.MRTD}, MinimumTEETCBSVN: c.TDX.TEETCBSVN}}); err != nil {
		t.Errorf("Check with the quote's own values: %v", err)
	}
	err = c.Check(Requirements{TDX: TDXRequirements{AllowDebug: true, MRTDs: [][]byte{make([]byte, 48)}}})
	var rules []string
	for _, v := range Violations(err) {
		rules = append(rules, v.Rule)
	}
	if diff := cmp.Diff([]string{"tdx.mrtd"}, rules); diff != "" {
		t.Errorf("Check with another MRTD: violations (-want +got):\n%s", diff)
	}
}

// TestTDXQuoteV5Layout checks the parser on quotes built by hand: a TD report 1.0 body, bytes
// after the signed data, and shapes it must refuse.
func TestTDXQuoteV5Layout(t *testing.T) {
	base := tdxHandBuiltV5(tdxBodyTypeTDReport15)
	tests := map[string]struct {
		raw    []byte
		reason Reason
	}{
		"TD report 1.5":             {raw: base},
		"TD report 1.0":             {raw: tdxHandBuiltV5(tdxBodyTypeTDReport10)},
		"bytes after the quote":     {raw: append(bytes.Clone(base), 0, 0, 0)},
		"unknown body type":         {raw: tdxWithU16(base, 0x30, 4), reason: ReasonMalformed},
		"body size not its type's":  {raw: tdxWithU16(base, 0x32, tdxTDReport10Size), reason: ReasonMalformed},
		"TEE type SGX":              {raw: tdxWithU16(base, 4, 0), reason: ReasonMalformed},
		"certification data type 5": {raw: tdxWithU16(base, tdxV5QuoteSig+128, 5), reason: ReasonMalformed},
		"truncated":                 {raw: base[:len(base)-1], reason: ReasonMalformed},
		"signed data size too big":  {raw: tdxWithU16(base, tdxV5SignedSize, 0xffff), reason: ReasonMalformed},
		"header only":               {raw: base[:0x30], reason: ReasonMalformed},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			q, err := parseTDXQuoteV5(tc.raw)
			if got := ReasonOf(err); got != tc.reason {
				t.Fatalf("parseTDXQuoteV5: reason %q (%v), want %q", got, err, tc.reason)
			}
			if err != nil {
				return
			}
			if !bytes.Equal(q.pckChain, []byte(tdxHandBuiltChain)) || len(q.qeAuthData) != 32 {
				t.Errorf("PCK chain %q, QE auth data %d bytes; want the hand-built ones", q.pckChain, len(q.qeAuthData))
			}
			if _, err := tdxValidationQuote(tc.raw); err != nil && !bytes.Contains([]byte(err.Error()), []byte("PCK")) {
				t.Errorf("tdxValidationQuote: %v", err)
			}
		})
	}
}

// tdxHandBuiltChain stands for a PEM chain in hand-built quotes: the parser takes the chain's
// bytes as they are; reading the certificates is a later step.
const tdxHandBuiltChain = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"

// tdxHandBuiltV5 returns a quote v5 of the given body type laid out as Intel's DCAP quote v5,
// with patterned bytes where signatures, keys and measurements would be.
func tdxHandBuiltV5(bodyType uint16) []byte {
	var q []byte
	le16 := func(v uint16) { q = binary.LittleEndian.AppendUint16(q, v) }
	le32 := func(v uint32) { q = binary.LittleEndian.AppendUint32(q, v) }
	pattern := func(n int, seed byte) {
		for i := range n {
			q = append(q, seed+byte(i))
		}
	}
	le16(tdxQuoteV5Version)
	le16(tdxAttestationKeyType)
	le32(tdxTEEType)
	pattern(40, 0x10)
	size := uint32(tdxTDReport10Size)
	if bodyType == tdxBodyTypeTDReport15 {
		size = tdxTDReport15Size
	}
	le16(bodyType)
	le32(size)
	pattern(int(size), 0x40)
	certData := tdxQEReportSize + 64 + 2 + 32 + 6 + len(tdxHandBuiltChain)
	le32(uint32(128 + 6 + certData))
	pattern(128, 0x80)
	le16(tdxCertDataQEReport)
	le32(uint32(certData))
	pattern(tdxQEReportSize+64, 0xa0)
	le16(32)
	pattern(32, 0xc0)
	le16(tdxCertDataPCKChainPEM)
	le32(uint32(len(tdxHandBuiltChain)))
	q = append(q, tdxHandBuiltChain...)
	return q
}

func tdxWithU16(b []byte, off int, v uint16) []byte {
	b = bytes.Clone(b)
	binary.LittleEndian.PutUint16(b[off:], v)
	return b
}
