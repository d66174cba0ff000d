package attest_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	tdxverify "github.com/google/go-tdx-guest/verify"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

const (
	// realTDXQuote is the TDX quote v4 (Sapphire Rapids) that go-tdx-guest ships as testdata.
	realTDXQuote = "testdata/tdx-quote-spr-e4.dat"
	// realTDXCollateral is the collateral Intel PCS served for it (go-tdx-guest's testdata, laid
	// out as Lethe's collateral cache): TCB info for FMSPC 50806f000000, QE identity, PCK CRL
	// and root CA CRL, all valid on realTDXTime.
	realTDXCollateral = "testdata/tdx-collateral"
)

var realTDXTime = time.Date(2023, time.July, 1, 1, 0, 0, 0, time.UTC)

var tdxBinding = attest.Binding{
	MigrationID:   "mig-tdx-0001",
	Role:          attest.RoleSource,
	Nonce:         bytes.Repeat([]byte{0x17}, attest.NonceSize),
	HPKEPublicKey: []byte("source hpke public key"),
	Statement:     []byte(`{"keysZeroized":true}`),
}

// The emulated TDX platforms shared by the tests: making one costs five ECDSA keys and a dozen
// signatures.
var (
	tdxBase  = sync.OnceValues(func() (emulate.Platform, error) { return emulate.New(attest.PlatformEmulatedTDX, tdxOpts) })
	tdxOther = sync.OnceValues(func() (emulate.Platform, error) { return emulate.New(attest.PlatformEmulatedTDX, emulate.Options{}) })
	tdxOpts  = emulate.Options{
		MRTD:      bytes.Repeat([]byte{0xd1}, 48),
		RTMRs:     [4][]byte{bytes.Repeat([]byte{0x10}, 48), bytes.Repeat([]byte{0x11}, 48), bytes.Repeat([]byte{0x12}, 48), bytes.Repeat([]byte{0x13}, 48)},
		TEETCBSVN: []byte{0x06, 0x01, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		FMSPC:     []byte{0x90, 0xc0, 0x6f, 0, 0, 0},
		MRSEAM:    bytes.Repeat([]byte{0x5e}, 48),
	}
)

func tdxPlatform(t testing.TB, once func() (emulate.Platform, error)) emulate.Platform {
	t.Helper()
	p, err := once()
	if err != nil {
		t.Fatalf("emulating TDX: %v", err)
	}
	return p
}

func newTDX(t testing.TB, opts emulate.Options) emulate.Platform {
	t.Helper()
	p, err := emulate.New(attest.PlatformEmulatedTDX, opts)
	if err != nil {
		t.Fatalf("emulating TDX: %v", err)
	}
	return p
}

func tdxEvidence(t testing.TB, p emulate.Platform) *attest.Evidence {
	t.Helper()
	ev, err := attest.Produce(t.Context(), p, tdxBinding)
	if err != nil {
		t.Fatalf("Produce: %v", err)
	}
	return ev
}

func tdxVerifier(t testing.TB, cfg attest.Config) *attest.Verifier {
	t.Helper()
	v, err := attest.NewVerifier(cfg)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	return v
}

func realTDXEvidence(t testing.TB) *attest.Evidence {
	t.Helper()
	raw, err := os.ReadFile(realTDXQuote)
	if err != nil {
		t.Fatal(err)
	}
	return &attest.Evidence{Platform: attest.PlatformTDX, Raw: raw}
}

func at(t time.Time) func() time.Time { return func() time.Time { return t } }

// Offsets in a quote v4: the header (0x30) and TD report body (0x248) are signed; the quote
// signature follows the 4-byte signed-data size.
const (
	tdxReportDataOffset = 0x30 + 0x208
	tdxSignatureOffset  = 0x27c
	tdxQEReportOffset   = 0x27c + 0x80 + 6
)

func flip(off int) func([]byte) []byte {
	return func(b []byte) []byte { b[off] ^= 0x01; return b }
}

// inconsistentSizes makes q's certification data claim 16 bytes, fewer than a QE report, with
// the signed-data size to match: go-tdx-guest's parser slices past the end of such a quote.
func inconsistentSizes(q []byte) []byte {
	const certSize = 16
	binary.LittleEndian.PutUint32(q[0x278:], 0x80+6+certSize)
	binary.LittleEndian.PutUint32(q[tdxSignatureOffset+0x80+2:], certSize)
	return q
}

func TestVerifyTDX(t *testing.T) {
	base := tdxPlatform(t, tdxBase)
	ev := tdxEvidence(t, base)
	roots := []attest.Roots{base.Roots()}

	revoked := newTDX(t, emulate.Options{})
	revokedEv := tdxEvidence(t, revoked)
	if err := revoked.(*emulate.TDX).RevokePCK(); err != nil {
		t.Fatal(err)
	}

	// A platform whose TCB was raised after it signed: its old quotes are OutOfDate.
	dir := t.TempDir()
	low, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{TEETCBSVN: []byte{2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}})
	if err != nil {
		t.Fatal(err)
	}
	lowEv := tdxEvidence(t, low)
	high, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{TEETCBSVN: []byte{3, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}})
	if err != nil {
		t.Fatal(err)
	}

	otherBinding := tdxBinding
	otherBinding.Nonce = bytes.Repeat([]byte{0x18}, attest.NonceSize)
	relabel := func(ev *attest.Evidence, p attest.Platform) *attest.Evidence {
		c := *ev
		c.Platform = p
		return &c
	}
	withRaw := func(ev *attest.Evidence, f func([]byte) []byte) *attest.Evidence {
		c := *ev
		c.Raw = f(bytes.Clone(ev.Raw))
		return &c
	}

	tests := map[string]struct {
		ev   *attest.Evidence
		cfg  attest.Config
		want *attest.Binding
		// reason is the rejection's reason; "" means the evidence verifies.
		reason attest.Reason
	}{
		"emulated":                 {ev: ev, cfg: attest.Config{Roots: roots}},
		"emulated with revocation": {ev: ev, cfg: attest.Config{Roots: roots, CheckRevocations: true}},
		"flipped signature byte":   {ev: withRaw(ev, flip(tdxSignatureOffset+5)), cfg: attest.Config{Roots: roots}, reason: attest.ReasonSignature},
		"flipped report data byte": {ev: withRaw(ev, flip(tdxReportDataOffset)), cfg: attest.Config{Roots: roots}, reason: attest.ReasonSignature},
		"flipped QE report byte":   {ev: withRaw(ev, flip(tdxQEReportOffset+0x40)), cfg: attest.Config{Roots: roots}, reason: attest.ReasonSignature},
		"other emulator's roots":   {ev: ev, cfg: attest.Config{Roots: []attest.Roots{tdxPlatform(t, tdxOther).Roots()}}, reason: attest.ReasonChain},
		"wrong report data":        {ev: ev, cfg: attest.Config{Roots: roots}, want: &otherBinding, reason: attest.ReasonBinding},
		"revoked PCK":              {ev: revokedEv, cfg: attest.Config{Roots: []attest.Roots{revoked.Roots()}, CheckRevocations: true}, reason: attest.ReasonRevoked},
		"revoked PCK, unchecked":   {ev: revokedEv, cfg: attest.Config{Roots: []attest.Roots{revoked.Roots()}}},
		"PCK expired":              {ev: ev, cfg: attest.Config{Roots: roots, Now: at(time.Now().AddDate(8, 0, 0))}, reason: attest.ReasonExpired},
		"collateral expired":       {ev: ev, cfg: attest.Config{Roots: roots, Now: at(time.Now().AddDate(0, 0, 31))}, reason: attest.ReasonExpired},
		"not yet valid":            {ev: ev, cfg: attest.Config{Roots: roots, Now: at(time.Now().AddDate(0, 0, -1))}, reason: attest.ReasonExpired},
		"TCB out of date":          {ev: lowEv, cfg: attest.Config{Roots: []attest.Roots{high.Roots()}}, reason: attest.ReasonTCB},
		"emulated without roots":   {ev: ev, cfg: attest.Config{}, reason: attest.ReasonPlatform},
		// Refused before its chain is looked at: no Intel collateral rates its FMSPC.
		"emulated as real tdx": {ev: relabel(ev, attest.PlatformTDX), cfg: attest.Config{Roots: roots, CollateralDir: realTDXCollateral}, reason: attest.ReasonCollateral},
		"real as emulated":     {ev: relabel(realTDXEvidence(t), attest.PlatformEmulatedTDX), cfg: attest.Config{Roots: roots, Now: at(realTDXTime)}, reason: attest.ReasonChain},
		"truncated":            {ev: withRaw(ev, func(b []byte) []byte { return b[:len(b)-100] }), cfg: attest.Config{Roots: roots}, reason: attest.ReasonMalformed},
		"inconsistent sizes":   {ev: withRaw(ev, inconsistentSizes), cfg: attest.Config{Roots: roots}, reason: attest.ReasonMalformed},
		"not a quote":          {ev: withRaw(ev, func([]byte) []byte { return []byte("junk") }), cfg: attest.Config{Roots: roots}, reason: attest.ReasonMalformed},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			want := tc.want
			if want == nil {
				want = &tdxBinding
			}
			claims, err := tdxVerifier(t, tc.cfg).Verify(t.Context(), tc.ev, attest.Expectation{Binding: want})
			if got := attest.ReasonOf(err); got != tc.reason {
				t.Fatalf("Verify: reason %q (%v), want %q", got, err, tc.reason)
			}
			if err != nil {
				if _, ok := errors.AsType[*attest.RejectError](err); !ok {
					t.Errorf("Verify error %T is not a *RejectError", err)
				}
				return
			}
			if claims.TDX == nil || claims.Platform != tc.ev.Platform {
				t.Fatalf("claims = %+v, want TDX claims of %v", claims, tc.ev.Platform)
			}
		})
	}
}

func TestVerifyTDXClaims(t *testing.T) {
	p := tdxPlatform(t, tdxBase)
	ev := tdxEvidence(t, p)
	claims, err := tdxVerifier(t, attest.Config{Roots: []attest.Roots{p.Roots()}}).Verify(t.Context(), ev, attest.Expectation{Binding: &tdxBinding})
	if err != nil {
		t.Fatal(err)
	}
	rd := tdxBinding.ReportData()
	digest := ev.Digest()
	if diff := cmp.Diff(attest.HexBytes(rd[:]), claims.ReportData); diff != "" {
		t.Errorf("report data (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(attest.HexBytes(digest[:]), claims.EvidenceDigest); diff != "" {
		t.Errorf("evidence digest (-want +got):\n%s", diff)
	}
	got := claims.TDX
	want := map[string]string{
		"teeTcbSvn": hex.EncodeToString(tdxOpts.TEETCBSVN),
		"mrSeam":    hex.EncodeToString(tdxOpts.MRSEAM),
		"mrTd":      hex.EncodeToString(tdxOpts.MRTD),
		"rtmr2":     hex.EncodeToString(tdxOpts.RTMRs[2]),
		"fmspc":     hex.EncodeToString(tdxOpts.FMSPC),
		"debug":     "false",
		"tcbStatus": "UpToDate",
		"qeSvn":     "8",
		"pceSvn":    "13",
		"xfam":      "e718060000000000",
		"attrs":     "0000001000000000",
	}
	gotMap := map[string]string{
		"teeTcbSvn": got.TEETCBSVN.String(),
		"mrSeam":    got.MRSEAM.String(),
		"mrTd":      got.MRTD.String(),
		"rtmr2":     got.RTMRs[2].String(),
		"fmspc":     got.FMSPC.String(),
		"debug":     fmt.Sprint(got.Debug),
		"tcbStatus": got.TCBStatus,
		"qeSvn":     fmt.Sprint(got.QESVN),
		"pceSvn":    fmt.Sprint(got.PCESVN),
		"xfam":      got.XFAM.String(),
		"attrs":     got.TDAttributes.String(),
	}
	if diff := cmp.Diff(want, gotMap); diff != "" {
		t.Errorf("TDX claims (-want +got):\n%s", diff)
	}
}

// TestVerifyTDXReal verifies the real quote go-tdx-guest ships against Intel's SGX root, offline,
// with the collateral go-tdx-guest ships beside it. That TCB info (evaluation data number 15)
// lists no TCB level the quote's TEE TCB SVN (03000400…) reaches: every level wants SVN 5 in
// component 2. So with collateral the quote is rejected for its TCB, after its PCK chain, its
// revocation status (PCK and root CRLs), its signatures and the signatures and validity of TCB
// info and QE identity have all verified; go-tdx-guest's own tests expect the same rejection.
func TestVerifyTDXReal(t *testing.T) {
	ev := realTDXEvidence(t)
	skip := attest.Expectation{SkipReportData: true}
	const noLevel = "no matching TCB level found"
	tests := map[string]struct {
		cfg        attest.Config
		reason     attest.Reason
		errHas     string
		wantStatus string
	}{
		"no collateral source":       {cfg: attest.Config{Now: at(realTDXTime)}, reason: attest.ReasonCollateral, errHas: "TCB info and QE identity"},
		"collateral and revocations": {cfg: attest.Config{CollateralDir: realTDXCollateral, CheckRevocations: true, Now: at(realTDXTime)}, reason: attest.ReasonTCB, errHas: noLevel},
		"collateral":                 {cfg: attest.Config{CollateralDir: realTDXCollateral, Now: at(realTDXTime)}, reason: attest.ReasonTCB, errHas: noLevel},
		"with emulator roots too":    {cfg: attest.Config{CollateralDir: realTDXCollateral, CheckRevocations: true, Now: at(realTDXTime), Roots: []attest.Roots{tdxPlatform(t, tdxBase).Roots()}}, reason: attest.ReasonTCB, errHas: noLevel},
		"collateral expired":         {cfg: attest.Config{CollateralDir: realTDXCollateral, Now: at(realTDXTime.AddDate(0, 1, 0))}, reason: attest.ReasonExpired, errHas: "tcbInfo has expired"},
		"QE identity expired":        {cfg: attest.Config{CollateralDir: realTDXCollateral, CheckRevocations: true, Now: at(time.Date(2023, 7, 10, 0, 0, 0, 0, time.UTC))}, reason: attest.ReasonExpired, errHas: "QeIdentity has expired"},
		"PCK expired":                {cfg: attest.Config{CollateralDir: realTDXCollateral, Now: at(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}, reason: attest.ReasonExpired},
		"collateral missing":         {cfg: attest.Config{CollateralDir: t.TempDir(), Now: at(realTDXTime)}, reason: attest.ReasonCollateral},
		"revocations without CRLs":   {cfg: attest.Config{CheckRevocations: true, Now: at(realTDXTime)}, reason: attest.ReasonCollateral},
		"chain only":                 {cfg: attest.Config{TDXChainOnly: true, Now: at(realTDXTime)}, wantStatus: attest.TDXStatusUnknown},
		"chain only, PCK expired":    {cfg: attest.Config{TDXChainOnly: true, Now: at(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}, reason: attest.ReasonExpired},
		"chain only, revocations":    {cfg: attest.Config{TDXChainOnly: true, CheckRevocations: true, Now: at(realTDXTime)}, reason: attest.ReasonCollateral},
		"chain only with collateral": {cfg: attest.Config{TDXChainOnly: true, CollateralDir: realTDXCollateral, Now: at(realTDXTime)}, reason: attest.ReasonTCB, errHas: noLevel},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			claims, err := tdxVerifier(t, tc.cfg).Verify(t.Context(), ev, skip)
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
				"fmspc":     claims.TDX.FMSPC.String(),
				"teeTcbSvn": claims.TDX.TEETCBSVN.String(),
				"tcbStatus": claims.TDX.TCBStatus,
				"debug":     fmt.Sprint(claims.TDX.Debug),
			}
			want := map[string]string{
				"fmspc":     "50806f000000",
				"teeTcbSvn": "03000400000000000000000000000000",
				"tcbStatus": tc.wantStatus,
				"debug":     "false",
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("claims (-want +got):\n%s", diff)
			}
		})
	}

	// Without collateral a real quote is refused whatever is expected of it: its TCB level
	// (platform, TDX module, quoting enclave) would be unknown. (Its REPORT_DATA check is the
	// one every platform shares, tested on emulated evidence: no real quote with collateral
	// that rates it up to date ships with go-tdx-guest.)
	for _, want := range []attest.Expectation{{SkipReportData: true}, {Binding: &tdxBinding}} {
		if _, err := tdxVerifier(t, attest.Config{Now: at(realTDXTime), CheckRevocations: false}).Verify(t.Context(), ev, want); attest.ReasonOf(err) != attest.ReasonCollateral {
			t.Errorf("Verify without collateral, expecting %+v: %v, want reason collateral", want, err)
		}
	}
}

func ruleNames(err error) []string {
	var out []string
	for _, v := range attest.Violations(err) {
		out = append(out, v.Rule)
	}
	return out
}

func TestCheckTDX(t *testing.T) {
	p := tdxPlatform(t, tdxBase)
	debug := newTDX(t, emulate.Options{Debug: true})
	verify := func(p emulate.Platform) *attest.Claims {
		c, err := tdxVerifier(t, attest.Config{Roots: []attest.Roots{p.Roots()}}).Verify(t.Context(), tdxEvidence(t, p), attest.Expectation{Binding: &tdxBinding})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	claims, debugClaims := verify(p), verify(debug)
	other := func(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }
	svn := func(b ...byte) []byte { return append(b, make([]byte, 16-len(b))...) }

	tests := map[string]struct {
		claims *attest.Claims
		req    attest.TDXRequirements
		want   []string
	}{
		"nothing required":       {claims: claims},
		"everything met":         {claims: claims, req: attest.TDXRequirements{MinimumTEETCBSVN: tdxOpts.TEETCBSVN, MRSEAMs: [][]byte{tdxOpts.MRSEAM}, MRTDs: [][]byte{other(1, 48), tdxOpts.MRTD}, RTMRs: [4][][]byte{nil, {tdxOpts.RTMRs[1]}, {other(2, 48), tdxOpts.RTMRs[2]}, nil}, TDAttributes: claims.TDX.TDAttributes, XFAM: claims.TDX.XFAM, MinimumQESVN: 8, MinimumPCESVN: 13, FMSPCs: [][]byte{tdxOpts.FMSPC}}},
		"debug TD":               {claims: debugClaims, want: []string{"tdx.attributes.debug"}},
		"debug TD allowed":       {claims: debugClaims, req: attest.TDXRequirements{AllowDebug: true}},
		"TEE TCB SVN below":      {claims: claims, req: attest.TDXRequirements{MinimumTEETCBSVN: svn(6, 1, 4)}, want: []string{"tdx.teeTcbSvn"}},
		"TEE TCB SVN equal":      {claims: claims, req: attest.TDXRequirements{MinimumTEETCBSVN: svn(6, 1, 3)}},
		"TEE TCB SVN bad length": {claims: claims, req: attest.TDXRequirements{MinimumTEETCBSVN: []byte{1}}, want: []string{"tdx.teeTcbSvn"}},
		"MRTD not listed":        {claims: claims, req: attest.TDXRequirements{MRTDs: [][]byte{other(1, 48), other(2, 48)}}, want: []string{"tdx.mrtd"}},
		"MRTD bad length":        {claims: claims, req: attest.TDXRequirements{MRTDs: [][]byte{tdxOpts.MRTD, {1}}}, want: []string{"tdx.mrtd"}},
		"RTMR2 not listed":       {claims: claims, req: attest.TDXRequirements{RTMRs: [4][][]byte{{tdxOpts.RTMRs[0]}, nil, {other(9, 48)}, nil}}, want: []string{"tdx.rtmr2"}},
		"MRSEAM not listed":      {claims: claims, req: attest.TDXRequirements{MRSEAMs: [][]byte{other(3, 48)}}, want: []string{"tdx.mrseam"}},
		"TD attributes":          {claims: claims, req: attest.TDXRequirements{TDAttributes: other(0, 8)}, want: []string{"tdx.attributes"}},
		"XFAM":                   {claims: claims, req: attest.TDXRequirements{XFAM: []byte{3, 0, 0, 0, 0, 0, 0, 0}}, want: []string{"tdx.xfam"}},
		"QE SVN below":           {claims: claims, req: attest.TDXRequirements{MinimumQESVN: 9}, want: []string{"tdx.qeSvn"}},
		"PCE SVN below":          {claims: claims, req: attest.TDXRequirements{MinimumPCESVN: 14}, want: []string{"tdx.pceSvn"}},
		"FMSPC not listed":       {claims: claims, req: attest.TDXRequirements{FMSPCs: [][]byte{{0x50, 0x80, 0x6f, 0, 0, 0}}}, want: []string{"tdx.fmspc"}},
		"several at once": {claims: debugClaims, req: attest.TDXRequirements{MinimumTEETCBSVN: svn(9), MRTDs: [][]byte{other(1, 48)}, MinimumPCESVN: 99},
			want: []string{"tdx.attributes.debug", "tdx.teeTcbSvn", "tdx.mrtd", "tdx.pceSvn"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := tc.claims.Check(attest.Requirements{TDX: tc.req})
			if diff := cmp.Diff(tc.want, ruleNames(err)); diff != "" {
				t.Errorf("violated rules (-want +got):\n%s\nerror: %v", diff, err)
			}
		})
	}

	t.Run("violation names the values", func(t *testing.T) {
		err := claims.Check(attest.Requirements{TDX: attest.TDXRequirements{MinimumTEETCBSVN: svn(7)}})
		vs := attest.Violations(err)
		if len(vs) != 1 {
			t.Fatalf("violations = %v, want one", err)
		}
		if !strings.Contains(vs[0].Got, hex.EncodeToString(tdxOpts.TEETCBSVN)) || !strings.Contains(vs[0].Want, hex.EncodeToString(svn(7))) {
			t.Errorf("violation %q does not name the claim and the minimum", vs[0])
		}
	})
	t.Run("claims without a quote", func(t *testing.T) {
		c := &attest.Claims{Platform: attest.PlatformEmulatedTDX, TDX: &attest.TDXClaims{}}
		if diff := cmp.Diff([]string{"tdx.quote"}, ruleNames(c.Check(attest.Requirements{}))); diff != "" {
			t.Errorf("violated rules (-want +got):\n%s", diff)
		}
	})
}

// TestVerifyTDXConcurrent verifies from many goroutines with one Verifier (run with -race: the
// go-tdx-guest options it builds must not be shared).
func TestVerifyTDXConcurrent(t *testing.T) {
	p := tdxPlatform(t, tdxBase)
	v := tdxVerifier(t, attest.Config{Roots: []attest.Roots{p.Roots()}, CollateralDir: realTDXCollateral, CheckRevocations: true})
	// The real quote goes the whole way with its collateral and is then rejected for its TCB
	// (see TestVerifyTDXReal).
	vReal := tdxVerifier(t, attest.Config{CollateralDir: realTDXCollateral, CheckRevocations: true, Now: at(realTDXTime)})
	ev, real := tdxEvidence(t, p), realTDXEvidence(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 8 {
		wg.Go(func() {
			if _, err := v.Verify(t.Context(), ev, attest.Expectation{Binding: &tdxBinding}); err != nil {
				errs <- err
			}
		})
		wg.Go(func() {
			if _, err := vReal.Verify(t.Context(), real, attest.Expectation{SkipReportData: true}); attest.ReasonOf(err) != attest.ReasonTCB {
				errs <- fmt.Errorf("real quote: %w, want reason tcb", err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// BenchmarkVerifyTDX measures verification plus a typical requirement check. (The emulated-tdx
// case of BenchmarkVerify checks the zero requirements.)
func BenchmarkVerifyTDX(b *testing.B) {
	req := attest.Requirements{TDX: attest.TDXRequirements{
		MinimumTEETCBSVN: tdxOpts.TEETCBSVN, MRTDs: [][]byte{tdxOpts.MRTD}, MRSEAMs: [][]byte{tdxOpts.MRSEAM},
		RTMRs: [4][][]byte{{tdxOpts.RTMRs[0]}, {tdxOpts.RTMRs[1]}, nil, nil}, FMSPCs: [][]byte{tdxOpts.FMSPC},
	}}
	b.Run("emulated-tdx", func(b *testing.B) {
		p := tdxPlatform(b, tdxBase)
		ev := tdxEvidence(b, p)
		v := tdxVerifier(b, attest.Config{Roots: []attest.Roots{p.Roots()}, CheckRevocations: true})
		for b.Loop() {
			c, err := v.Verify(b.Context(), ev, attest.Expectation{Binding: &tdxBinding})
			if err != nil {
				b.Fatal(err)
			}
			if err := c.Check(req); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestVerifyTDXQuiet checks that verification prints nothing: go-tdx-guest's logger writes to
// stdout, where lethectl prints its JSON. It runs the verifications in a child process and reads
// the child's stdout; the "loud" child calls go-tdx-guest the way Lethe must not (without
// trusted roots), to show that the check would see the library's output.
func TestVerifyTDXQuiet(t *testing.T) {
	const childEnv = "LETHE_TDX_QUIET_CHILD"
	switch os.Getenv(childEnv) {
	case "quiet":
		p := tdxPlatform(t, tdxBase)
		for _, cfg := range []attest.Config{{Roots: []attest.Roots{p.Roots()}, CheckRevocations: true}, {}} {
			_, _ = tdxVerifier(t, cfg).Verify(t.Context(), tdxEvidence(t, p), attest.Expectation{Binding: &tdxBinding})
		}
		for _, cfg := range []attest.Config{{Now: at(realTDXTime)}, {CollateralDir: realTDXCollateral, CheckRevocations: true, Now: at(realTDXTime)}} {
			_, _ = tdxVerifier(t, cfg).Verify(t.Context(), realTDXEvidence(t), attest.Expectation{SkipReportData: true})
		}
		return
	case "loud":
		_ = tdxverify.RawTdxQuote(realTDXEvidence(t).Raw, &tdxverify.Options{Now: realTDXTime})
		return
	}
	run := func(mode string) string {
		cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestVerifyTDXQuiet$", "-test.count=1")
		cmd.Env = append(os.Environ(), childEnv+"="+mode)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("running the %s child: %v", mode, err)
		}
		return string(out)
	}
	if diff := cmp.Diff("PASS\n", run("quiet")); diff != "" {
		t.Errorf("verification printed to stdout (-want +got):\n%s", diff)
	}
	if out := run("loud"); !strings.Contains(out, "WARN") {
		t.Errorf("go-tdx-guest without trusted roots printed %q, want its warning: the check cannot see its output", out)
	}
}
