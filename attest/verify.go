package attest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/internal/errtree"
)

// Reason names what a rejection is about, so that callers, audit events and operators see one
// word before the details.
type Reason string

// The reasons a Verifier or a requirement check gives.
const (
	ReasonMalformed   Reason = "malformed"   // the bytes do not parse
	ReasonPlatform    Reason = "platform"    // platform not accepted by this verifier
	ReasonSignature   Reason = "signature"   // the report or quote signature does not verify
	ReasonChain       Reason = "chain"       // the certificate chain does not lead to a pinned root
	ReasonRevoked     Reason = "revoked"     // a certificate in the chain is revoked
	ReasonExpired     Reason = "expired"     // a certificate or collateral is outside its validity
	ReasonCollateral  Reason = "collateral"  // collateral needed for verification is missing
	ReasonBinding     Reason = "binding"     // REPORT_DATA does not match the expected binding
	ReasonTCB         Reason = "tcb"         // TCB below a required minimum
	ReasonDebug       Reason = "debug"       // debug enabled where forbidden
	ReasonRequirement Reason = "requirement" // any other baseline requirement failed
)

// RejectError is the error of evidence that did not verify or did not meet a requirement.
type RejectError struct {
	Reason Reason
	Err    error
}

func (e *RejectError) Error() string {
	return fmt.Sprintf("evidence rejected (%s): %v", e.Reason, e.Err)
}
func (e *RejectError) Unwrap() error { return e.Err }

func reject(reason Reason, format string, args ...any) error {
	return &RejectError{Reason: reason, Err: fmt.Errorf(format, args...)}
}

// ReasonOf returns the Reason of the first RejectError in err's tree, or "" if there is none.
func ReasonOf(err error) Reason {
	if re, ok := errors.AsType[*RejectError](err); ok {
		return re.Reason
	}
	return ""
}

// Config configures a Verifier. The zero value verifies real hardware evidence against the
// vendors' roots built into go-sev-guest and go-tdx-guest, with no collateral cache and no
// network access.
type Config struct {
	// Roots are extra roots of trust, such as an emulator's (see attest/emulate). Evidence
	// naming an emulated platform is accepted only if Roots holds roots for that platform.
	Roots []Roots
	// CollateralDir is the offline collateral cache (VCEK/VLEK certificates, CRLs, TDX TCB info
	// and QE identity). Empty: no cache.
	CollateralDir string
	// TDXCollateral holds Intel PCS documents for real TDX quotes (TCB info, QE identity, CRLs),
	// keyed by the URL PCS publishes them at, with response headers under the URL plus
	// CollateralHeadersSuffix, as in Roots.Collateral; PCCSCollateral converts QuoteCollateralV3
	// JSON to this form. They are served before CollateralDir. Nil: none.
	TDXCollateral map[string][]byte
	// Fetch allows fetching missing collateral from AMD KDS / Intel PCS, rate limited and
	// written to CollateralDir. Off by default: the release path never needs the network once
	// the cache holds what a report needs.
	Fetch bool
	// CheckRevocations checks certificates against CRLs: for real evidence from CollateralDir
	// (or fetched), for emulated evidence from the emulator's own collateral (Roots). Off in
	// the zero value, for offline tools that inspect evidence; lethe-keybroker turns it on
	// unless told otherwise (--check-revocation=false). Whatever its value, a real TDX quote
	// is verified only with TCB info and QE identity, so it is refused (ReasonCollateral)
	// when neither CollateralDir nor Fetch is set.
	CheckRevocations bool
	// TDXChainOnly verifies a real TDX quote that comes without TCB info and QE identity (no
	// collateral configured) by its signatures and PCK chain alone, instead of refusing it
	// (ReasonCollateral): its claims then say TCBStatus TDXStatusUnknown. It is for tools that
	// inspect evidence (lethectl attest verify --chain-only); the keybroker never sets it. It
	// changes nothing when collateral is configured, or with CheckRevocations (CRLs are
	// collateral too).
	TDXChainOnly bool
	// Now returns the time at which certificates must be valid. Nil: time.Now.
	Now func() time.Time
	// ProductLine is the SNP product line ("Milan", "Genoa", "Turin") to assume for reports
	// that do not say (version 2), when the VCEK does not say either, and to expect of those
	// that do: a report naming another product is rejected (ReasonChain). Empty: infer.
	ProductLine string
}

// Roots are the roots of trust of one platform, as PEM certificates.
type Roots struct {
	Platform Platform
	// SNP: the ARK and ASK (or ASVK) certificates, keyed by product line.
	// TDX: the root CA certificate.
	Certificates map[string][]byte
	// Collateral served by an emulated PCS/KDS: TDX TCB info and QE identity (JSON as PCS
	// serves it), CRLs (DER; SEV-SNP's ARK-signed CRL too), keyed by the URL it is published
	// at, with response headers under the URL plus CollateralHeadersSuffix. Empty for real
	// platforms, whose collateral comes from Config.CollateralDir.
	Collateral map[string][]byte
	// CollateralDir is where the emulator publishes the same collateral as it changes (a
	// revocation, say), in the layout of the offline collateral cache. When set, a Verifier
	// reads the emulator's collateral from it on every verification instead of Collateral,
	// as it reads the real vendors' from Config.CollateralDir. LoadRoots sets it when the
	// emulator saved one; it is never saved itself.
	CollateralDir string `json:"-"`
}

// emulatorCache returns the collateral source of an emulator's roots r: r.CollateralDir if
// set, else the documents r.Collateral holds. It never reads Config.CollateralDir and never
// fetches: an emulator publishes at the vendors' URLs, so its documents must never be served
// for real evidence, nor the vendors' for emulated evidence.
func emulatorCache(r Roots) (*collateralCache, error) {
	if r.CollateralDir != "" {
		return newCollateralCache(r.CollateralDir, false), nil
	}
	c := newCollateralCache("", false)
	for key, body := range r.Collateral {
		if strings.HasSuffix(key, CollateralHeadersSuffix) {
			continue
		}
		var d collateralDoc
		if hb, ok := r.Collateral[key+CollateralHeadersSuffix]; ok {
			if err := json.Unmarshal(hb, &d); err != nil {
				return nil, fmt.Errorf("reading %v collateral headers of %s: %w", r.Platform, key, err)
			}
		}
		c.addStatic(key, d.Headers, body)
	}
	return c, nil
}

// Expectation is what a verifier checks beyond the chain. Exactly one of Binding and
// ReportData is set, unless SkipReportData says the caller inspects REPORT_DATA itself.
type Expectation struct {
	Binding        *Binding
	ReportData     []byte
	SkipReportData bool
}

// Verifier verifies evidence of every platform it is configured for. It is safe for
// concurrent use.
type Verifier struct {
	cfg Config
	snp *snpVerifier
	tdx *tdxVerifier
}

// NewVerifier returns a verifier for cfg.
func NewVerifier(cfg Config) (*Verifier, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	v := &Verifier{cfg: cfg}
	cache := newCollateralCache(cfg.CollateralDir, cfg.Fetch)
	var err error
	if v.snp, err = newSNPVerifier(cfg, cache); err != nil {
		return nil, fmt.Errorf("configuring SEV-SNP verification: %w", err)
	}
	if v.tdx, err = newTDXVerifier(cfg, cache); err != nil {
		return nil, fmt.Errorf("configuring TDX verification: %w", err)
	}
	return v, nil
}

// Verify checks ev's signature chain, revocation and binding and returns its claims. Every
// error is a *RejectError whose Reason names what failed, or ctx's error.
func (v *Verifier) Verify(ctx context.Context, ev *Evidence, want Expectation) (*Claims, error) {
	var claims *Claims
	var err error
	switch {
	case ev.Platform.IsSNP():
		claims, err = v.snp.verify(ctx, ev.Platform, ev.Raw)
	case ev.Platform.IsTDX():
		claims, err = v.tdx.verify(ctx, ev.Platform, ev.Raw)
	default:
		return nil, reject(ReasonPlatform, "unknown platform %v", ev.Platform)
	}
	if err != nil {
		return nil, err
	}
	claims.Platform = ev.Platform
	claims.HPKEPublicKey = ev.HPKEPublicKey
	claims.Statement = ev.Statement
	d := ev.Digest()
	claims.EvidenceDigest = d[:]
	if err := checkReportData(claims.ReportData, want); err != nil {
		return nil, err
	}
	return claims, nil
}

func checkReportData(got []byte, want Expectation) error {
	var expected []byte
	switch {
	case want.Binding != nil:
		rd := want.Binding.ReportData()
		expected = rd[:]
	case want.ReportData != nil:
		expected = want.ReportData
	case want.SkipReportData:
		return nil
	default:
		return reject(ReasonBinding, "no expected binding given")
	}
	if len(expected) > ReportDataSize {
		return reject(ReasonBinding, "expected report data is %d bytes, longer than %d", len(expected), ReportDataSize)
	}
	// A shorter expectation is zero-padded, as the hardware pads it.
	padded := make([]byte, ReportDataSize)
	copy(padded, expected)
	if string(padded) != string(got) {
		return reject(ReasonBinding, "report data %x does not match the expected binding %x", got, padded)
	}
	return nil
}

// Violation is one failed requirement: the rule's name and the values involved.
type Violation struct {
	Rule string // such as "snp.tcb.microcode" or "tdx.mrtd"
	Got  string
	Want string
}

func (v *Violation) Error() string {
	return fmt.Sprintf("%s %s, want %s", v.Rule, v.Got, v.Want)
}

// Requirements are baseline requirements on one end's claims, checked through go-sev-guest's
// and go-tdx-guest's validate packages. The zero value forbids debug, SMT and a migration agent
// (go-sev-guest's reading of a guest policy: the allowed bits are maxima), and requires nothing
// else.
type Requirements struct {
	SNP SNPRequirements
	TDX TDXRequirements
}

// SNPRequirements are checked on SEV-SNP claims. Empty lists allow anything.
type SNPRequirements struct {
	MinimumTCB       SNPTCB
	MinimumLaunchTCB SNPTCB
	AllowDebug       bool
	AllowSMT         bool
	AllowMigrateMA   bool
	Measurements     [][]byte
	Products         []string
	VMPL             *uint32
	ChipIDs          [][]byte
	HostData         []byte
}

// TDXRequirements are checked on TDX claims. Empty lists allow anything.
type TDXRequirements struct {
	MinimumTEETCBSVN []byte // 16 bytes, compared component by component
	MRSEAMs          [][]byte
	MRTDs            [][]byte
	RTMRs            [4][][]byte // per RTMR, the accepted values
	AllowDebug       bool
	TDAttributes     []byte
	XFAM             []byte
	MinimumQESVN     uint16
	MinimumPCESVN    uint16
	FMSPCs           [][]byte
}

// Check evaluates r on c and returns every failed requirement as a *Violation joined with
// errors.Join, or nil when c meets r.
func (c *Claims) Check(r Requirements) error {
	switch {
	case c.SNP != nil:
		return checkSNP(c.SNP, r.SNP)
	case c.TDX != nil:
		return checkTDX(c.TDX, r.TDX)
	}
	return &Violation{Rule: "platform", Got: c.Platform.String(), Want: "verified claims"}
}

// Violations returns the violations in err's tree.
func Violations(err error) []*Violation { return errtree.All[*Violation](err) }

func joinNames(items []string) string { return strings.Join(items, ", ") }
