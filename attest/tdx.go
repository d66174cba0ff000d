package attest

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	"github.com/google/go-tdx-guest/validate"
	tdxverify "github.com/google/go-tdx-guest/verify"
)

// intelSGXRootCA is Intel's SGX Root CA, the root of every real TDX quote's PCK chain and of
// Intel PCS's collateral. It is the certificate go-tdx-guest embeds as its default root; Lethe
// pins it itself so that go-tdx-guest never falls back to its default (which it announces with
// a log line on stdout) and so that the root real quotes are verified against is visible here.
const intelSGXRootCA = `-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
`

// Logging: go-tdx-guest's verify package initializes github.com/google/logger to write to
// stdout, and that logger offers no way to redirect it afterwards. At its default verbosity the
// only line it prints on the paths Lethe takes is a warning when no trusted roots are given;
// tdxVerifier always gives them, and never raises the verbosity, so verification prints
// nothing and CLI output stays clean.

// maxTDXQuoteSize bounds a quote: a quote v4 with its PCK chain is about 5 KiB.
const maxTDXQuoteSize = 64 << 10

// CollateralHeadersSuffix is the suffix of a key in Roots.Collateral (and of a file in a collateral
// directory) that holds, as JSON {"headers": {...}}, the response headers served with the
// document at the key without the suffix. Intel PCS sends the issuer chains of TCB info, QE
// identity and CRLs in headers.
const CollateralHeadersSuffix = ".headers.json"

// tdxTrust is what one root of trust verifies TDX quotes with.
type tdxTrust struct {
	root *x509.Certificate
	pool *x509.CertPool
	// cache serves the collateral of quotes chaining to root; nil: none can be had, and real
	// quotes are refused (ReasonCollateral).
	cache *collateralCache
}

// tdxVerifier verifies TDX quotes v4 and v5: real ones against Intel's SGX root with
// collateral from the offline cache, Config.TDXCollateral (or Intel PCS when fetching is on),
// emulated ones against the configured emulator roots with the emulator's collateral only.
// go-tdx-guest verifies a quote v4's signatures and PCK chain; Lethe parses and verifies a quote
// v5 the same way (tdxv5.go), and does the collateral step for both (tdxtcb.go). Safe for
// concurrent use: every call builds its own go-tdx-guest options, which that library writes
// into.
//
// Unlike snpVerifier it keeps no cache of verified chains and collateral: every check is ECDSA
// P-256, and a quote with collateral verifies in about 2 ms.
type tdxVerifier struct {
	cfg      Config
	intel    tdxTrust
	emulated []tdxTrust
}

func newTDXVerifier(cfg Config, cache *collateralCache) (*tdxVerifier, error) {
	root, err := tdxParseRootPEM([]byte(intelSGXRootCA))
	if err != nil {
		return nil, fmt.Errorf("parsing Intel's SGX root: %w", err)
	}
	v := &tdxVerifier{cfg: cfg, intel: tdxTrust{root: root, pool: tdxPoolOf(root)}}
	switch {
	case len(cfg.TDXCollateral) > 0:
		c, err := collateralCacheWith(cfg.CollateralDir, cfg.Fetch, cfg.TDXCollateral, "TDX")
		if err != nil {
			return nil, err
		}
		v.intel.cache = c
	case cfg.CollateralDir != "" || cfg.Fetch:
		v.intel.cache = cache
	}
	for _, r := range cfg.Roots {
		switch r.Platform {
		case PlatformTDX:
			return nil, errors.New("roots for tdx given: real TDX quotes verify only against Intel's SGX root")
		case PlatformEmulatedTDX:
		default:
			continue
		}
		if len(r.Certificates) == 0 {
			return nil, errors.New("emulated-tdx roots hold no root certificate")
		}
		// The emulator's collateral is served from a cache of its own: it is published at Intel
		// PCS's URLs, so it must never be served for a real quote, nor for another emulator's.
		ecache, err := emulatorCache(r)
		if err != nil {
			return nil, err
		}
		for name, p := range r.Certificates {
			root, err := tdxParseRootPEM(p)
			if err != nil {
				return nil, fmt.Errorf("parsing emulated-tdx root %q: %w", name, err)
			}
			v.emulated = append(v.emulated, tdxTrust{root: root, pool: tdxPoolOf(root), cache: ecache})
		}
	}
	return v, nil
}

func tdxParseRootPEM(p []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(p)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM certificate")
	}
	return x509.ParseCertificate(b.Bytes)
}

func tdxPoolOf(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}

// parseTDXQuote decodes a raw TDX quote v4. It checks shape only; it proves nothing. Its errors
// are *RejectError with ReasonMalformed.
func parseTDXQuote(raw []byte) (_ *pb.QuoteV4, err error) {
	if len(raw) > maxTDXQuoteSize {
		return nil, reject(ReasonMalformed, "TDX quote of %d bytes exceeds the %d-byte limit", len(raw), maxTDXQuoteSize)
	}
	// go-tdx-guest's parser slices by sizes read from the quote without checking all of them
	// against its length; a hostile quote must be an error, not a crash.
	defer func() {
		if r := recover(); r != nil {
			err = reject(ReasonMalformed, "parsing TDX quote: inconsistent sizes (%v)", r)
		}
	}()
	q, err := abi.QuoteToProto(raw)
	if err != nil {
		return nil, reject(ReasonMalformed, "parsing TDX quote: %w", err)
	}
	quote, ok := q.(*pb.QuoteV4)
	if !ok {
		return nil, reject(ReasonMalformed, "parsing TDX quote: %T is not a quote v4", q)
	}
	return quote, nil
}

// tdxParsedQuote is a parsed quote v4 or v5 with its PCK chain; it proves nothing.
type tdxParsedQuote struct {
	v4    *pb.QuoteV4 // set for a quote v4
	v5    *tdxQuoteV5 // set for a quote v5
	chain []*x509.Certificate
}

// parseTDXEvidence decodes a raw quote v4 or v5 and its PCK chain. Its errors are *RejectError
// with ReasonMalformed.
func parseTDXEvidence(raw []byte) (*tdxParsedQuote, error) {
	var q tdxParsedQuote
	var pemChain []byte
	if tdxQuoteVersion(raw) == tdxQuoteV5Version {
		v5, err := parseTDXQuoteV5(raw)
		if err != nil {
			return nil, err
		}
		q.v5, pemChain = v5, v5.pckChain
	} else {
		v4, err := parseTDXQuote(raw)
		if err != nil {
			return nil, err
		}
		q.v4 = v4
		pemChain = v4.GetSignedData().GetCertificationData().GetQeReportCertificationData().GetPckCertificateChainData().GetPckCertChain()
	}
	chain, err := tdxParsePCKChainPEM(pemChain)
	if err != nil {
		return nil, reject(ReasonMalformed, "reading TDX quote: %w", err)
	}
	q.chain = chain
	return &q, nil
}

// facts returns what the TCB step needs of q.
func (q *tdxParsedQuote) facts() *tdxQuoteFacts {
	if q.v5 != nil {
		return q.v5.facts(q.chain)
	}
	b := q.v4.GetTdQuoteBody()
	r := q.v4.GetSignedData().GetCertificationData().GetQeReportCertificationData().GetQeReport()
	return &tdxQuoteFacts{
		teeTCBSVN: b.GetTeeTcbSvn(), mrSignerSEAM: b.GetMrSignerSeam(), seamAttributes: b.GetSeamAttributes(),
		qe: tdxQEReport{
			miscSelect: r.GetMiscSelect(), attributes: r.GetAttributes(), mrSigner: r.GetMrSigner(),
			isvProdID: uint16(r.GetIsvProdId()), isvSVN: uint16(r.GetIsvSvn()),
		},
		chain: q.chain,
	}
}

func (v *tdxVerifier) verify(ctx context.Context, p Platform, raw []byte) (*Claims, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	quote, err := parseTDXEvidence(raw)
	if err != nil {
		return nil, err
	}
	chain := quote.chain
	var trust tdxTrust
	switch p {
	case PlatformTDX:
		trust = v.intel
	case PlatformEmulatedTDX:
		if len(v.emulated) == 0 {
			return nil, reject(ReasonPlatform, "emulated-tdx evidence is accepted only by a verifier configured with the emulator's roots, and none are")
		}
		found := false
		for _, t := range v.emulated {
			if bytes.Equal(t.root.Raw, chain[2].Raw) {
				trust, found = t, true
				break
			}
		}
		if !found {
			return nil, reject(ReasonChain, "verifying TDX quote: its PCK chain ends at a root (%s, serial %x) that is none of the configured emulated-tdx roots", chain[2].Subject, chain[2].SerialNumber)
		}
	default:
		return nil, reject(ReasonPlatform, "%v is not a TDX platform", p)
	}
	if trust.cache == nil {
		// Without TCB info and QE identity the quote says nothing trustworthy about the TCB
		// level of the platform, the TDX module and the quoting enclave: refused, never passed
		// with an unknown status, unless the caller asked for the chain alone.
		if !v.cfg.TDXChainOnly || v.cfg.CheckRevocations {
			return nil, reject(ReasonCollateral, "verifying a real TDX quote needs Intel's TCB info and QE identity (and CRLs): configure a collateral directory or fetching")
		}
		return v.verifyChainOnly(quote, chain, trust, raw)
	}
	exts, err := tdxPCKExtensions(chain[0])
	if err != nil {
		return nil, err
	}
	collateral, err := fetchTDXCollateral(ctx, trust.cache, trust.root, exts, chain[0], v.cfg.CheckRevocations)
	if err != nil {
		return nil, err
	}

	now := v.cfg.Now()
	if err := quote.verifySignatures(chain, trust.pool, now); err != nil {
		return nil, err
	}

	if err := verifyTDXCollateral(collateral, trust.root, chain, now); err != nil {
		return nil, err
	}
	status, err := tdxTCBStatus(collateral, quote.facts(), exts)
	if err != nil {
		return nil, err
	}
	fmspc, err := hex.DecodeString(exts.FMSPC)
	if err != nil {
		return nil, reject(ReasonMalformed, "reading the PCK certificate's FMSPC: %w", err)
	}
	return quote.claims(raw, fmspc, status), nil
}

// verifySignatures verifies the quote's signatures and its PCK chain to a root in pool at now:
// go-tdx-guest verifies a quote v4 without its own collateral step (Lethe's follows), Lethe
// verifies a quote v5 the same way.
func (q *tdxParsedQuote) verifySignatures(chain []*x509.Certificate, pool *x509.CertPool, now time.Time) error {
	if q.v5 != nil {
		return verifyTDXQuoteV5(q.v5, chain, pool, now)
	}
	if err := tdxverify.TdxQuote(q.v4, &tdxverify.Options{Now: now, TrustedRoots: pool}); err != nil {
		return &RejectError{Reason: tdxReason(err), Err: fmt.Errorf("verifying TDX quote: %w", err)}
	}
	return nil
}

// TDXStatusUnknown is the TCB status of a quote verified by its signatures and PCK chain
// alone (Config.TDXChainOnly): no TCB info says what its TCB level is.
const TDXStatusUnknown = "Unknown"

// verifyChainOnly verifies quote's signatures and PCK chain to trust's root, and nothing of its
// TCB level (Config.TDXChainOnly).
func (v *tdxVerifier) verifyChainOnly(quote *tdxParsedQuote, chain []*x509.Certificate, trust tdxTrust, raw []byte) (*Claims, error) {
	if err := quote.verifySignatures(chain, trust.pool, v.cfg.Now()); err != nil {
		return nil, err
	}
	exts, err := tdxPCKExtensions(chain[0])
	if err != nil {
		return nil, err
	}
	fmspc, err := hex.DecodeString(exts.FMSPC)
	if err != nil {
		return nil, reject(ReasonMalformed, "reading the PCK certificate's FMSPC: %w", err)
	}
	return quote.claims(raw, fmspc, TDXStatusUnknown), nil
}

// claims returns the claims of q, verified, with the PCK certificate's FMSPC and the TCB status.
func (q *tdxParsedQuote) claims(raw, fmspc []byte, status string) *Claims {
	var body tdxReportBody
	var version, qeSVN, pceSVN uint16
	if q.v5 != nil {
		body, version, qeSVN, pceSVN = q.v5.body, tdxQuoteV5Version, q.v5.qeSVN(), q.v5.pceSVN()
	} else {
		b, h := q.v4.GetTdQuoteBody(), q.v4.GetHeader()
		body = tdxReportBody{
			teeTCBSVN: b.GetTeeTcbSvn(), mrSEAM: b.GetMrSeam(), mrSignerSEAM: b.GetMrSignerSeam(),
			seamAttributes: b.GetSeamAttributes(), tdAttributes: b.GetTdAttributes(), xfam: b.GetXfam(),
			mrTD: b.GetMrTd(), mrConfigID: b.GetMrConfigId(), mrOwner: b.GetMrOwner(), mrOwnerConfig: b.GetMrOwnerConfig(),
			reportData: b.GetReportData(),
		}
		copy(body.rtmrs[:], b.GetRtmrs())
		version = uint16(h.GetVersion())
		qeSVN, pceSVN = binary.LittleEndian.Uint16(h.GetQeSvn()), binary.LittleEndian.Uint16(h.GetPceSvn())
	}
	c := &TDXClaims{
		QuoteVersion:  version,
		TEETCBSVN:     bytes.Clone(body.teeTCBSVN),
		MRSEAM:        bytes.Clone(body.mrSEAM),
		MRSignerSEAM:  bytes.Clone(body.mrSignerSEAM),
		SEAMAttribute: bytes.Clone(body.seamAttributes),
		TDAttributes:  bytes.Clone(body.tdAttributes),
		Debug:         len(body.tdAttributes) > 0 && body.tdAttributes[0]&tdAttributeDebug != 0,
		XFAM:          bytes.Clone(body.xfam),
		MRTD:          bytes.Clone(body.mrTD),
		MRConfigID:    bytes.Clone(body.mrConfigID),
		MROwner:       bytes.Clone(body.mrOwner),
		MROwnerConfig: bytes.Clone(body.mrOwnerConfig),
		TEETCBSVN2:    bytes.Clone(body.teeTCBSVN2),
		MRServiceTD:   bytes.Clone(body.mrServiceTD),
		QESVN:         qeSVN,
		PCESVN:        pceSVN,
		FMSPC:         fmspc,
		TCBStatus:     status,
		raw:           bytes.Clone(raw),
	}
	for i, r := range body.rtmrs {
		c.RTMRs[i] = bytes.Clone(r)
	}
	return &Claims{ReportData: bytes.Clone(body.reportData), TDX: c}
}

// tdAttributeDebug is bit 0 of TD_ATTRIBUTES (little-endian): the TD is debuggable, so the
// host can read and write its memory.
const tdAttributeDebug = 0x01

// tdxReason maps a go-tdx-guest verification error to a Reason. The library wraps most errors
// with %v, so its sentinels are matched where they survive and its messages otherwise.
func tdxReason(err error) Reason {
	switch {
	case errors.Is(err, tdxverify.ErrHashVerificationFail), errors.Is(err, tdxverify.ErrSHA56VerificationFail):
		return ReasonSignature
	}
	msg := err.Error()
	has := func(subs ...string) bool {
		for _, s := range subs {
			if strings.Contains(msg, s) {
				return true
			}
		}
		return false
	}
	switch {
	case has(ErrCollateralMissing.Error(), "unable to receive tcbInfo", "unable to receive QeIdentity",
		"unable to receive PCK CRL", "unable to receive Root CA CRL", "collateral received is an empty structure",
		"missing"):
		return ReasonCollateral
	case has("revoked"):
		return ReasonRevoked
	case has("expired", "not yet valid"):
		return ReasonExpired
	case has("failed TCB status check"):
		return ReasonTCB
	case has("QuoteV4 invalid", "attestation key in the quote is invalid", "unsupported quote type", "TEE type"):
		return ReasonMalformed
	case has("signature verification", "could not verify response body", "unable to verify message digest",
		"signature to DER"):
		return ReasonSignature
	}
	// Everything else is a certificate, CRL or collateral that does not lead to the pinned root
	// or does not describe this quote's platform, QE or TDX module.
	return ReasonChain
}

// checkTDX evaluates r on c through go-tdx-guest's validate package where it checks the same
// thing, and with its own code for lists of accepted values, the FMSPC allowlist and debug.
func checkTDX(c *TDXClaims, r TDXRequirements) error {
	var errs []error
	if !r.AllowDebug && c.Debug {
		errs = append(errs, &Violation{Rule: "tdx.attributes.debug", Got: "debug TD (TD_ATTRIBUTES bit 0 set: the host can read and write its memory)", Want: "no debug"})
	}
	if len(r.FMSPCs) > 0 && !tdxContains(r.FMSPCs, c.FMSPC) {
		errs = append(errs, &Violation{Rule: "tdx.fmspc", Got: hex.EncodeToString(c.FMSPC), Want: "one of " + tdxJoinHex(r.FMSPCs)})
	}
	if c.raw == nil {
		errs = append(errs, &Violation{Rule: "tdx.quote", Got: "claims without a verified quote", Want: "claims returned by Verifier.Verify"})
		return errors.Join(errs...)
	}
	quote, err := tdxValidationQuote(c.raw)
	if err != nil {
		errs = append(errs, &Violation{Rule: "tdx.quote", Got: err.Error(), Want: "a TDX quote v4 or v5"})
		return errors.Join(errs...)
	}
	// validate always checks the architecturally fixed bits of XFAM and TD_ATTRIBUTES beside
	// what it is asked; its errors on empty options are the baseline that a rule's own check
	// adds to.
	baseline := validate.TdxQuote(quote, &validate.Options{})
	if baseline != nil {
		errs = append(errs, &Violation{Rule: "tdx.fixedBits", Got: baseline.Error(), Want: "XFAM and TD_ATTRIBUTES within the architecture's fixed bits"})
	}
	fails := func(o validate.Options) bool {
		err := validate.TdxQuote(quote, &o)
		return tdxCountErrors(err) > tdxCountErrors(baseline)
	}
	check := func(rule string, got []byte, size int, candidates [][]byte, opts func([]byte) validate.Options) {
		if len(candidates) == 0 {
			return
		}
		for _, want := range candidates {
			if len(want) != size {
				errs = append(errs, &Violation{Rule: rule, Got: hex.EncodeToString(got), Want: fmt.Sprintf("a valid requirement (%x is %d bytes, not %d)", want, len(want), size)})
				return
			}
		}
		for _, want := range candidates {
			if !fails(opts(want)) {
				return
			}
		}
		errs = append(errs, &Violation{Rule: rule, Got: hex.EncodeToString(got), Want: "one of " + tdxJoinHex(candidates)})
	}

	if r.MinimumTEETCBSVN != nil {
		if len(r.MinimumTEETCBSVN) != abi.TeeTcbSvnSize {
			errs = append(errs, &Violation{Rule: "tdx.teeTcbSvn", Got: c.TEETCBSVN.String(), Want: fmt.Sprintf("a valid minimum (%x is %d bytes, not %d)", r.MinimumTEETCBSVN, len(r.MinimumTEETCBSVN), abi.TeeTcbSvnSize)})
		} else if fails(validate.Options{TdQuoteBodyOptions: validate.TdQuoteBodyOptions{MinimumTeeTcbSvn: r.MinimumTEETCBSVN}}) {
			errs = append(errs, &Violation{Rule: "tdx.teeTcbSvn", Got: c.TEETCBSVN.String(), Want: fmt.Sprintf(">= %x component by component", r.MinimumTEETCBSVN)})
		}
	}
	check("tdx.mrseam", c.MRSEAM, abi.MrSeamSize, r.MRSEAMs, func(b []byte) validate.Options {
		return validate.Options{TdQuoteBodyOptions: validate.TdQuoteBodyOptions{MrSeam: b}}
	})
	check("tdx.mrtd", c.MRTD, abi.MrTdSize, r.MRTDs, func(b []byte) validate.Options {
		return validate.Options{TdQuoteBodyOptions: validate.TdQuoteBodyOptions{MrTd: b}}
	})
	for i := range r.RTMRs {
		check(fmt.Sprintf("tdx.rtmr%d", i), c.RTMRs[i], abi.RtmrSize, r.RTMRs[i], func(b []byte) validate.Options {
			rtmrs := make([][]byte, len(r.RTMRs))
			rtmrs[i] = b
			return validate.Options{TdQuoteBodyOptions: validate.TdQuoteBodyOptions{Rtmrs: rtmrs}}
		})
	}
	if r.TDAttributes != nil {
		check("tdx.attributes", c.TDAttributes, abi.TdAttributesSize, [][]byte{r.TDAttributes}, func(b []byte) validate.Options {
			return validate.Options{TdQuoteBodyOptions: validate.TdQuoteBodyOptions{TdAttributes: b}}
		})
	}
	if r.XFAM != nil {
		check("tdx.xfam", c.XFAM, abi.XfamSize, [][]byte{r.XFAM}, func(b []byte) validate.Options {
			return validate.Options{TdQuoteBodyOptions: validate.TdQuoteBodyOptions{Xfam: b}}
		})
	}
	if r.MinimumQESVN > 0 && fails(validate.Options{HeaderOptions: validate.HeaderOptions{MinimumQeSvn: r.MinimumQESVN}}) {
		errs = append(errs, &Violation{Rule: "tdx.qeSvn", Got: fmt.Sprint(c.QESVN), Want: fmt.Sprintf(">= %d", r.MinimumQESVN)})
	}
	if r.MinimumPCESVN > 0 && fails(validate.Options{HeaderOptions: validate.HeaderOptions{MinimumPceSvn: r.MinimumPCESVN}}) {
		errs = append(errs, &Violation{Rule: "tdx.pceSvn", Got: fmt.Sprint(c.PCESVN), Want: fmt.Sprintf(">= %d", r.MinimumPCESVN)})
	}
	return errors.Join(errs...)
}

// tdxCountErrors counts the errors go-tdx-guest combined into err.
func tdxCountErrors(err error) int {
	if err == nil {
		return 0
	}
	if m, ok := err.(interface{ Unwrap() []error }); ok {
		return len(m.Unwrap())
	}
	return 1
}

func tdxContains(list [][]byte, b []byte) bool {
	for _, x := range list {
		if bytes.Equal(x, b) {
			return true
		}
	}
	return false
}

func tdxJoinHex(list [][]byte) string {
	s := make([]string, len(list))
	for i, b := range list {
		s[i] = hex.EncodeToString(b)
	}
	return joinNames(s)
}
