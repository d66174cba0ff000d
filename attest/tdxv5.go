package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"math/big"
	"time"

	pb "github.com/google/go-tdx-guest/proto/tdx"
)

// TDX quote v5 (DCAP 1.21 and later, TDX 1.5), which go-tdx-guest v0.3.1 does not parse. Its
// layout, little-endian:
//
//	0x000  header, 48 bytes, as v4's (version 5, attestation key type 2, TEE type 0x81)
//	0x030  body type, 2 bytes: 2 = TD report 1.0 (584 bytes), 3 = TD report 1.5 (648 bytes)
//	0x032  body size, 4 bytes
//	0x036  body: v4's TD report body, then for 1.5 TEE_TCB_SVN_2 (16) and MRSERVICETD (48)
//	       signed data size, 4 bytes, then the signed data, laid out as v4's:
//	         ECDSA P-256 signature r‖s (64) over header‖body type‖body size‖body
//	         attestation key x‖y (64)
//	         certification data type (2) = 6, size (4), then
//	           QE report (384), its signature by the PCK key (64),
//	           QE auth data size (2) and data,
//	           certification data type (2) = 5, size (4), PCK chain as PEM (leaf first)
//
// Bytes after the signed data are ignored, as go-tdx-guest ignores them after a quote v4.

// Sizes and values of a quote v5.
const (
	tdxQuoteV5Version      = 5
	tdxHeaderSize          = 0x30
	tdxAttestationKeyType  = 2
	tdxTEEType             = 0x81
	tdxBodyTypeTDReport10  = 2
	tdxBodyTypeTDReport15  = 3
	tdxTDReport10Size      = 584
	tdxTDReport15Size      = 648
	tdxQEReportSize        = 384
	tdxCertDataQEReport    = 6
	tdxCertDataPCKChainPEM = 5
)

// tdxReportBody is a TD report body, 1.0 (v4 and v5) or 1.5 (v5 only).
type tdxReportBody struct {
	teeTCBSVN, mrSEAM, mrSignerSEAM, seamAttributes, tdAttributes, xfam []byte
	mrTD, mrConfigID, mrOwner, mrOwnerConfig                            []byte
	rtmrs                                                               [4][]byte
	reportData                                                          []byte
	// TD report 1.5 only; nil otherwise.
	teeTCBSVN2, mrServiceTD []byte
}

// tdxQuoteV5 is a parsed quote v5. Its byte slices alias the raw quote.
type tdxQuoteV5 struct {
	header   []byte
	bodyType uint16
	body     tdxReportBody
	// signed is what the attestation key signs: header, body type, body size and body.
	signed         []byte
	signature      []byte // r‖s
	attestationKey []byte // x‖y
	qeReport       []byte // the 384-byte SGX report of the quoting enclave
	qeSignature    []byte // r‖s, by the PCK key
	qeAuthData     []byte
	pckChain       []byte // PEM
	qe             tdxQEReport
}

// tdxReader reads a quote front to back; it panics on nothing and fails once.
type tdxReader struct {
	b   []byte
	off int
	err error
}

func (r *tdxReader) take(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || len(r.b)-r.off < n {
		r.err = fmt.Errorf("%s: %d bytes at offset %#x, but the quote ends at %#x", what, n, r.off, len(r.b))
		return nil
	}
	out := r.b[r.off : r.off+n : r.off+n]
	r.off += n
	return out
}

func (r *tdxReader) u16(what string) uint16 {
	if b := r.take(2, what); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (r *tdxReader) u32(what string) uint32 {
	if b := r.take(4, what); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

// parseTDXReportBody splits a TD report body of 584 (1.0) or 648 (1.5) bytes.
func parseTDXReportBody(b []byte) tdxReportBody {
	r := &tdxReader{b: b}
	var t tdxReportBody
	t.teeTCBSVN = r.take(16, "TEE_TCB_SVN")
	t.mrSEAM = r.take(48, "MRSEAM")
	t.mrSignerSEAM = r.take(48, "MRSIGNERSEAM")
	t.seamAttributes = r.take(8, "SEAMATTRIBUTES")
	t.tdAttributes = r.take(8, "TDATTRIBUTES")
	t.xfam = r.take(8, "XFAM")
	t.mrTD = r.take(48, "MRTD")
	t.mrConfigID = r.take(48, "MRCONFIGID")
	t.mrOwner = r.take(48, "MROWNER")
	t.mrOwnerConfig = r.take(48, "MROWNERCONFIG")
	for i := range t.rtmrs {
		t.rtmrs[i] = r.take(48, "RTMR")
	}
	t.reportData = r.take(64, "REPORTDATA")
	if len(b) == tdxTDReport15Size {
		t.teeTCBSVN2 = r.take(16, "TEE_TCB_SVN_2")
		t.mrServiceTD = r.take(48, "MRSERVICETD")
	}
	return t
}

// tdxQuoteVersion returns the version of a raw TDX quote, or 0 when raw is too short to say.
func tdxQuoteVersion(raw []byte) uint16 {
	if len(raw) < 2 {
		return 0
	}
	return binary.LittleEndian.Uint16(raw)
}

// parseTDXQuoteV5 decodes a raw TDX quote v5. It checks shape only; it proves nothing. Its
// errors are *RejectError with ReasonMalformed.
func parseTDXQuoteV5(raw []byte) (*tdxQuoteV5, error) {
	if len(raw) > maxTDXQuoteSize {
		return nil, reject(ReasonMalformed, "TDX quote of %d bytes exceeds the %d-byte limit", len(raw), maxTDXQuoteSize)
	}
	r := &tdxReader{b: raw}
	q := &tdxQuoteV5{}
	q.header = r.take(tdxHeaderSize, "header")
	q.bodyType = r.u16("body type")
	bodySize := r.u32("body size")
	if r.err != nil {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %w", r.err)
	}
	version, keyType, tee := binary.LittleEndian.Uint16(q.header), binary.LittleEndian.Uint16(q.header[2:]), binary.LittleEndian.Uint32(q.header[4:])
	switch {
	case version != tdxQuoteV5Version:
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: header version %d", version)
	case keyType != tdxAttestationKeyType:
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: attestation key type %d, want %d (ECDSA P-256)", keyType, tdxAttestationKeyType)
	case tee != tdxTEEType:
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: TEE type %#x, want %#x (TDX)", tee, tdxTEEType)
	}
	want := map[uint16]uint32{tdxBodyTypeTDReport10: tdxTDReport10Size, tdxBodyTypeTDReport15: tdxTDReport15Size}[q.bodyType]
	if want == 0 {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: body type %d, want %d (TD report 1.0) or %d (TD report 1.5)", q.bodyType, tdxBodyTypeTDReport10, tdxBodyTypeTDReport15)
	}
	if bodySize != want {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: body of type %d is %d bytes, want %d", q.bodyType, bodySize, want)
	}
	body := r.take(int(bodySize), "body")
	q.signed = raw[:r.off:r.off]
	signedSize := r.u32("signed data size")
	if r.err != nil {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %w", r.err)
	}
	q.body = parseTDXReportBody(body)

	// The signed data, read within its declared size.
	sd := &tdxReader{b: r.take(int(min(signedSize, uint32(maxTDXQuoteSize))), "signed data")}
	if r.err != nil {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %w", r.err)
	}
	q.signature = sd.take(64, "quote signature")
	q.attestationKey = sd.take(64, "attestation key")
	certType := sd.u16("certification data type")
	certSize := sd.u32("certification data size")
	if sd.err == nil && certType != tdxCertDataQEReport {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: certification data type %d, want %d (QE report)", certType, tdxCertDataQEReport)
	}
	cd := &tdxReader{b: sd.take(int(min(certSize, uint32(maxTDXQuoteSize))), "certification data")}
	if sd.err == nil && sd.off != len(sd.b) {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %d bytes of signed data after the certification data", len(sd.b)-sd.off)
	}
	if sd.err != nil {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %w", sd.err)
	}
	q.qeReport = cd.take(tdxQEReportSize, "QE report")
	q.qeSignature = cd.take(64, "QE report signature")
	q.qeAuthData = cd.take(int(cd.u16("QE auth data size")), "QE auth data")
	chainType := cd.u16("PCK certification data type")
	chainSize := cd.u32("PCK certification data size")
	if cd.err == nil && chainType != tdxCertDataPCKChainPEM {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: PCK certification data type %d, want %d (PEM chain)", chainType, tdxCertDataPCKChainPEM)
	}
	q.pckChain = cd.take(int(min(chainSize, uint32(maxTDXQuoteSize))), "PCK chain")
	if cd.err == nil && cd.off != len(cd.b) {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %d bytes of certification data after the PCK chain", len(cd.b)-cd.off)
	}
	if cd.err != nil {
		return nil, reject(ReasonMalformed, "parsing TDX quote v5: %w", cd.err)
	}
	q.qe = tdxQEReport{
		miscSelect: binary.LittleEndian.Uint32(q.qeReport[16:20]),
		attributes: q.qeReport[48:64],
		mrSigner:   q.qeReport[128:160],
		isvProdID:  binary.LittleEndian.Uint16(q.qeReport[256:258]),
		isvSVN:     binary.LittleEndian.Uint16(q.qeReport[258:260]),
	}
	return q, nil
}

// bodySize is the size of q's body.
func (q *tdxQuoteV5) bodySize() uint32 {
	if q.bodyType == tdxBodyTypeTDReport15 {
		return tdxTDReport15Size
	}
	return tdxTDReport10Size
}

// qeSVN and pceSVN are the header's.
func (q *tdxQuoteV5) qeSVN() uint16  { return binary.LittleEndian.Uint16(q.header[10:12]) }
func (q *tdxQuoteV5) pceSVN() uint16 { return binary.LittleEndian.Uint16(q.header[8:10]) }

// facts returns what the TCB step needs of q, with its PCK chain.
func (q *tdxQuoteV5) facts(chain []*x509.Certificate) *tdxQuoteFacts {
	return &tdxQuoteFacts{teeTCBSVN: q.body.teeTCBSVN, mrSignerSEAM: q.body.mrSignerSEAM, seamAttributes: q.body.seamAttributes, qe: q.qe, chain: chain}
}

// verifyTDXQuoteV5 verifies a quote v5 as go-tdx-guest verifies a quote v4: the PCK chain to a
// root in roots (every certificate ECDSA P-256 with SHA-256 and valid at now), the QE report's
// signature by the PCK key, the QE report's REPORT_DATA (SHA-256 of the attestation key and
// the QE auth data, zero-padded), and the quote's signature by the attestation key. Its errors
// are *RejectError.
func verifyTDXQuoteV5(q *tdxQuoteV5, chain []*x509.Certificate, roots *x509.CertPool, now time.Time) error {
	names := []string{"PCK certificate", "PCK intermediate CA certificate", "PCK root certificate"}
	for i, c := range chain {
		if c.SignatureAlgorithm != x509.ECDSAWithSHA256 || c.PublicKeyAlgorithm != x509.ECDSA {
			return reject(ReasonChain, "%s is not ECDSA with SHA-256", names[i])
		}
		if pub, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
			return reject(ReasonChain, "%s holds no P-256 key", names[i])
		}
	}
	if n := chain[0].Subject.CommonName; n != "Intel SGX PCK Certificate" {
		return reject(ReasonChain, "PCK certificate is named %q, not \"Intel SGX PCK Certificate\"", n)
	}
	if n := chain[1].Subject.CommonName; n != intelPlatformCAName && n != intelProcessorCAName {
		return reject(ReasonChain, "PCK intermediate CA is named %q, neither %q nor %q", n, intelPlatformCAName, intelProcessorCAName)
	}
	// Validity first, so that an expired certificate is reported as expired, not as a chain
	// that does not verify.
	for i := len(chain) - 1; i >= 0; i-- {
		if err := tdxCheckValidity(names[i], chain[i], now); err != nil {
			return err
		}
	}
	intermediates := x509.NewCertPool()
	intermediates.AddCert(chain[1])
	if _, err := chain[0].Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: intermediates, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return reject(ReasonChain, "verifying the PCK chain: %w", err)
	}

	if !tdxVerifyRS(chain[0].PublicKey.(*ecdsa.PublicKey), q.qeReport, q.qeSignature) {
		return reject(ReasonSignature, "QE report signature does not verify with the PCK certificate")
	}
	want := sha256.Sum256(append(bytes.Clone(q.attestationKey), q.qeAuthData...))
	qeReportData := q.qeReport[320:384]
	if !bytes.Equal(qeReportData[:32], want[:]) || !bytes.Equal(qeReportData[32:], make([]byte, 32)) {
		return reject(ReasonSignature, "QE report data is not SHA-256 of the attestation key and QE auth data")
	}
	ak, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), append([]byte{0x04}, q.attestationKey...))
	if err != nil {
		return reject(ReasonMalformed, "attestation key in the quote is invalid: %w", err)
	}
	if !tdxVerifyRS(ak, q.signed, q.signature) {
		return reject(ReasonSignature, "quote signature does not verify with the attestation key")
	}
	return nil
}

// tdxVerifyRS verifies an ECDSA signature r‖s (32 bytes each) over SHA-256 of msg.
func tdxVerifyRS(pub *ecdsa.PublicKey, msg, sig []byte) bool {
	if len(sig) != 64 {
		return false
	}
	d := sha256.Sum256(msg)
	return ecdsa.Verify(pub, d[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:]))
}

// tdxParsePCKChainPEM returns the certificates of a PEM PCK chain, leaf first: exactly three,
// with nothing after them but an optional NUL byte.
func tdxParsePCKChainPEM(b []byte) ([]*x509.Certificate, error) {
	out, rest, err := tdxPEMCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("parsing the PCK chain: %w", err)
	}
	if len(out) != 3 {
		return nil, fmt.Errorf("PCK chain has %d certificates, want 3 (PCK, intermediate, root)", len(out))
	}
	if t := bytes.TrimRight(bytes.TrimSpace(rest), "\x00"); len(t) != 0 {
		return nil, fmt.Errorf("PCK chain has %d bytes after its certificates", len(t))
	}
	return out, nil
}

// tdxValidationQuote returns raw, a verified quote v4 or v5, as go-tdx-guest's QuoteV4 for its
// validate package, which compares fields and checks fixed bits but never signatures. A quote
// v5 is given the shape of a v4 one: its header as version 4, the TD report 1.0 part of its
// body, and its signed data. Such a QuoteV4 must never be verified: its signature is over the
// v5 layout.
func tdxValidationQuote(raw []byte) (*pb.QuoteV4, error) {
	if tdxQuoteVersion(raw) != tdxQuoteV5Version {
		return parseTDXQuote(raw)
	}
	q, err := parseTDXQuoteV5(raw)
	if err != nil {
		return nil, err
	}
	v4 := make([]byte, 0, len(raw))
	v4 = binary.LittleEndian.AppendUint16(v4, 4)
	v4 = append(v4, q.header[2:]...)
	v4 = append(v4, q.signed[len(q.signed)-int(q.bodySize()):][:tdxTDReport10Size]...)
	v4 = append(v4, raw[len(q.signed):]...)
	return parseTDXQuote(v4)
}
