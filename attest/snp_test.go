package attest_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// snpBase is one emulated SEV-SNP platform shared by the tests (making one costs two RSA keys).
var snpBase = sync.OnceValues(func() (emulate.Platform, error) {
	return emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{})
})

func baseSNP(t testing.TB) emulate.Platform {
	t.Helper()
	p, err := snpBase()
	if err != nil {
		t.Fatalf("making emulated SEV-SNP platform: %v", err)
	}
	return p
}

// snpVariant returns the base platform reopened with opts, and the directory its keys are in.
func snpVariant(t testing.TB, opts emulate.Options) (emulate.Platform, string) {
	t.Helper()
	dir := t.TempDir()
	if err := baseSNP(t).Save(dir); err != nil {
		t.Fatal(err)
	}
	p, err := emulate.Open(dir, attest.PlatformEmulatedSEVSNP, opts)
	if err != nil {
		t.Fatal(err)
	}
	return p, dir
}

var snpBinding = attest.Binding{
	MigrationID:   "mig-0001",
	Role:          attest.RoleDestination,
	Nonce:         bytes.Repeat([]byte{0x42}, attest.NonceSize),
	HPKEPublicKey: []byte("destination hpke public key"),
	Statement:     []byte(`{"zeroed":true}`),
}

func produceEvidence(t testing.TB, a attest.Attester, b attest.Binding) *attest.Evidence {
	t.Helper()
	ev, err := attest.Produce(t.Context(), a, b)
	if err != nil {
		t.Fatalf("Produce: %v", err)
	}
	return ev
}

// withRawBytes returns a copy of ev whose raw bytes are changed by f.
func withRawBytes(ev *attest.Evidence, f func([]byte) []byte) *attest.Evidence {
	c := *ev
	c.Raw = f(bytes.Clone(ev.Raw))
	return &c
}

// collateralDocPath is where the collateral cache keeps the document at rawURL.
func collateralDocPath(t testing.TB, dir, rawURL string) string {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	name := u.Host + u.Path
	if u.RawQuery != "" {
		name += "@" + u.RawQuery
	}
	return filepath.Join(dir, filepath.FromSlash(name))
}

func writeCollateralDoc(t testing.TB, dir, rawURL string, body []byte) {
	t.Helper()
	p := collateralDocPath(t, dir, rawURL)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, body, 0o644); err != nil {
		t.Fatal(err)
	}
}

// snpCerts returns the VCEK of emulated evidence and the ASK and ARK of its roots.
func snpCerts(t testing.TB, raw []byte, roots attest.Roots) (vcek, ask, ark *x509.Certificate) {
	t.Helper()
	var table abi.CertTable
	if err := table.Unmarshal(raw[abi.ReportSize:]); err != nil {
		t.Fatal(err)
	}
	der, err := table.GetByGUIDString(abi.VcekGUID)
	if err != nil {
		t.Fatal(err)
	}
	if vcek, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	askDER, arkDER, err := kds.ParseProductCertChain(roots.Certificates["Milan"])
	if err != nil {
		t.Fatal(err)
	}
	if ask, err = x509.ParseCertificate(askDER); err != nil {
		t.Fatal(err)
	}
	if ark, err = x509.ParseCertificate(arkDER); err != nil {
		t.Fatal(err)
	}
	return vcek, ask, ark
}

func readARKKey(t testing.TB, dir string) *rsa.PrivateKey {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "emulated-sev-snp", "ark.pem"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return key.(*rsa.PrivateKey)
}

// writeCRL writes a Milan CRL signed by key (as the ARK) revoking serials into dir.
func writeCRL(t testing.TB, dir string, ark *x509.Certificate, key *rsa.PrivateKey, nextUpdate time.Time, serials ...*big.Int) {
	t.Helper()
	tmpl := &x509.RevocationList{
		Number:             big.NewInt(1),
		ThisUpdate:         time.Now().Add(-time.Hour),
		NextUpdate:         nextUpdate,
		SignatureAlgorithm: x509.SHA384WithRSAPSS,
	}
	for _, s := range serials {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: s, RevocationTime: time.Now().Add(-time.Minute)})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, ark, key)
	if err != nil {
		t.Fatal(err)
	}
	writeCollateralDoc(t, dir, kds.CrlLinkByKey("Milan", abi.VcekReportSigner), der)
}

// realSNP is an attestation report from a Milan machine, shipped by go-sev-guest, with its VCEK
// in a collateral directory laid out as the cache keeps AMD KDS documents.
const (
	realSNPReport     = "testdata/snp/milan-v2-report.bin"
	realSNPCollateral = "testdata/snp/collateral"
)

// realSNPTime is a time at which the real report's VCEK (2022-09-24 to 2029-09-24) is valid.
var realSNPTime = time.Date(2024, time.March, 1, 0, 0, 0, 0, time.UTC)

func TestVerifySNP(t *testing.T) {
	base := baseSNP(t)
	roots := base.Roots()
	ev := produceEvidence(t, base, snpBinding)
	reportOnly := withRawBytes(ev, func(b []byte) []byte { return b[:abi.ReportSize] })
	vcek, ask, ark := snpCerts(t, ev.Raw, roots)

	// A platform with keys saved, to sign CRLs as its ARK.
	_, keyDir := snpVariant(t, emulate.Options{})
	arkKey := readARKKey(t, keyDir)
	savedRoots, err := attest.LoadRoots(keyDir)
	if err != nil {
		t.Fatal(err)
	}
	saved, err := emulate.Open(keyDir, attest.PlatformEmulatedSEVSNP, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	savedEv := produceEvidence(t, saved, snpBinding)
	savedVCEK, savedASK, savedARK := snpCerts(t, savedEv.Raw, savedRoots[0])
	if savedARK.SerialNumber.Cmp(ark.SerialNumber) != 0 || savedASK.SerialNumber.Cmp(ask.SerialNumber) != 0 {
		t.Fatal("a saved and reopened platform has other roots")
	}
	// crlRoots are the saved roots with the emulator's collateral read from dir: the CRLs
	// this test writes there stand for what the emulator publishes.
	crlRoots := func(dir string) []attest.Roots {
		rs := slices.Clone(savedRoots)
		for i := range rs {
			rs[i].CollateralDir = dir
		}
		return rs
	}
	crlDir := func(serials ...*big.Int) string {
		dir := t.TempDir()
		writeCRL(t, dir, savedARK, arkKey, time.Now().Add(24*time.Hour), serials...)
		return dir
	}
	otherKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}

	// The VCEK, in a collateral cache at the KDS URL of the report's chip ID and reported TCB.
	vcekDir := t.TempDir()
	claimsOK, err := newTestVerifier(t, attest.Config{Roots: []attest.Roots{roots}}).Verify(t.Context(), ev, attest.Expectation{Binding: &snpBinding})
	if err != nil {
		t.Fatalf("verifying emulated evidence: %v", err)
	}
	writeCollateralDoc(t, vcekDir, kds.VCEKCertURL("Milan", claimsOK.SNP.ChipID,
		tcbVersion(t, claimsOK.SNP.ReportedTCB)), vcek.Raw)

	realRaw, err := os.ReadFile(realSNPReport)
	if err != nil {
		t.Fatal(err)
	}
	real := &attest.Evidence{Platform: attest.PlatformSEVSNP, Raw: realRaw}
	realRD := []byte{1, 2, 3, 4, 5}
	pinned := func(tm time.Time) func() time.Time { return func() time.Time { return tm } }

	emu := attest.Config{Roots: []attest.Roots{roots}}
	tests := []struct {
		name string
		cfg  attest.Config
		ev   *attest.Evidence
		want attest.Expectation
		// reason is the expected rejection, "" for success.
		reason attest.Reason
	}{
		{name: "emulated", cfg: emu, ev: ev, want: attest.Expectation{Binding: &snpBinding}},
		{name: "emulated, raw report data", cfg: emu, ev: ev, want: attest.Expectation{ReportData: func() []byte { rd := snpBinding.ReportData(); return rd[:] }()}},
		{name: "emulated, binding not checked", cfg: emu, ev: ev, want: attest.Expectation{SkipReportData: true}},
		{name: "flipped measurement byte", cfg: emu, ev: withRawBytes(ev, func(b []byte) []byte { b[0x90] ^= 1; return b }), want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonSignature},
		{name: "flipped signature byte", cfg: emu, ev: withRawBytes(ev, func(b []byte) []byte { b[0x2a0+3] ^= 0x80; return b }), want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonSignature},
		{name: "truncated", cfg: emu, ev: withRawBytes(ev, func(b []byte) []byte { return b[:1000] }), want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonMalformed},
		{name: "certificate table out of bounds", cfg: emu, ev: withRawBytes(ev, func(b []byte) []byte { b[abi.ReportSize+16] = 0xff; b[abi.ReportSize+19] = 0xff; return b }), want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonMalformed},
		{name: "wrong binding", cfg: emu, ev: ev, want: attest.Expectation{Binding: &attest.Binding{MigrationID: "mig-0002", Role: attest.RoleDestination, Nonce: snpBinding.Nonce}}, reason: attest.ReasonBinding},
		{name: "no expectation", cfg: emu, ev: ev, reason: attest.ReasonBinding},
		{name: "other roots", cfg: attest.Config{Roots: []attest.Roots{otherSNPRoots(t)}}, ev: ev, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonChain},
		{name: "emulated without emulator roots", cfg: attest.Config{}, ev: ev, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonPlatform},
		{name: "emulated evidence named sev-snp", cfg: emu, ev: &attest.Evidence{Platform: attest.PlatformSEVSNP, Raw: ev.Raw}, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonChain},
		{name: "expired", cfg: attest.Config{Roots: emu.Roots, Now: pinned(time.Now().AddDate(30, 0, 0))}, ev: ev, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonExpired},
		{name: "not yet valid", cfg: attest.Config{Roots: emu.Roots, Now: pinned(time.Now().AddDate(-1, 0, 0))}, ev: ev, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonExpired},
		{name: "VCEK from the collateral cache", cfg: attest.Config{Roots: emu.Roots, CollateralDir: vcekDir}, ev: reportOnly, want: attest.Expectation{Binding: &snpBinding}},
		{name: "VCEK missing", cfg: emu, ev: reportOnly, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonCollateral},
		{name: "CRL revokes nothing", cfg: attest.Config{Roots: crlRoots(crlDir(big.NewInt(12345))), CheckRevocations: true}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}},
		{name: "ASK revoked", cfg: attest.Config{Roots: crlRoots(crlDir(savedASK.SerialNumber)), CheckRevocations: true}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonRevoked},
		{name: "VCEK revoked", cfg: attest.Config{Roots: crlRoots(crlDir(savedVCEK.SerialNumber)), CheckRevocations: true}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonRevoked},
		{name: "revoked, revocations not checked", cfg: attest.Config{Roots: crlRoots(crlDir(savedASK.SerialNumber))}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}},
		{name: "CRL missing", cfg: attest.Config{Roots: crlRoots(t.TempDir()), CheckRevocations: true}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonCollateral},
		{name: "CRL not signed by the ARK", cfg: attest.Config{Roots: crlRoots(func() string {
			dir := t.TempDir()
			writeCRL(t, dir, savedARK, otherKey, time.Now().Add(time.Hour))
			return dir
		}()), CheckRevocations: true}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonCollateral},
		{name: "CRL past its next update", cfg: attest.Config{Roots: crlRoots(crlDir()), CheckRevocations: true, Now: pinned(time.Now().Add(48 * time.Hour))}, ev: savedEv, want: attest.Expectation{Binding: &snpBinding}, reason: attest.ReasonExpired},
		{name: "real Milan report", cfg: attest.Config{CollateralDir: realSNPCollateral, Now: pinned(realSNPTime)}, ev: real, want: attest.Expectation{ReportData: realRD}},
		{name: "real Milan report, product line given", cfg: attest.Config{CollateralDir: realSNPCollateral, Now: pinned(realSNPTime), ProductLine: "Milan"}, ev: real, want: attest.Expectation{ReportData: realRD}},
		{name: "real Milan report, wrong product line", cfg: attest.Config{CollateralDir: realSNPCollateral, Now: pinned(realSNPTime), ProductLine: "Genoa"}, ev: real, want: attest.Expectation{ReportData: realRD}, reason: attest.ReasonCollateral},
		{name: "real Milan report, no collateral", cfg: attest.Config{Now: pinned(realSNPTime)}, ev: real, want: attest.Expectation{ReportData: realRD}, reason: attest.ReasonCollateral},
		{name: "real Milan report, VCEK expired", cfg: attest.Config{CollateralDir: realSNPCollateral, Now: pinned(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}, ev: real, want: attest.Expectation{ReportData: realRD}, reason: attest.ReasonExpired},
		{name: "real Milan report, flipped byte", cfg: attest.Config{CollateralDir: realSNPCollateral, Now: pinned(realSNPTime)}, ev: withRawBytes(real, func(b []byte) []byte { b[0x95] ^= 1; return b }), want: attest.Expectation{ReportData: realRD}, reason: attest.ReasonSignature},
		{name: "real report named emulated", cfg: attest.Config{Roots: emu.Roots, CollateralDir: realSNPCollateral, Now: pinned(realSNPTime)}, ev: &attest.Evidence{Platform: attest.PlatformEmulatedSEVSNP, Raw: realRaw}, want: attest.Expectation{ReportData: realRD}, reason: attest.ReasonChain},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			claims, err := newTestVerifier(t, tt.cfg).Verify(t.Context(), tt.ev, tt.want)
			if got := attest.ReasonOf(err); got != tt.reason || (err != nil && tt.reason == "") {
				t.Fatalf("Verify: reason %q, error %v; want reason %q", got, err, tt.reason)
			}
			if err != nil {
				if _, ok := err.(*attest.RejectError); !ok {
					t.Errorf("Verify error is %T, want *attest.RejectError", err)
				}
				return
			}
			if claims.Platform != tt.ev.Platform || claims.SNP == nil || claims.TDX != nil {
				t.Fatalf("claims: platform %v, SNP %v, TDX %v", claims.Platform, claims.SNP != nil, claims.TDX != nil)
			}
			d := tt.ev.Digest()
			if diff := cmp.Diff(attest.HexBytes(d[:]), claims.EvidenceDigest); diff != "" {
				t.Errorf("evidence digest (-want +got):\n%s", diff)
			}
		})
	}
}

func tcbVersion(t testing.TB, tcb attest.SNPTCB) kds.TCBVersion {
	t.Helper()
	v, err := kds.ComposeTCBParts(kds.TCBParts{BlSpl: tcb.BootLoader, TeeSpl: tcb.TEE, SnpSpl: tcb.SNP, UcodeSpl: tcb.Microcode})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

var otherSNP = sync.OnceValues(func() (emulate.Platform, error) {
	return emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{})
})

func otherSNPRoots(t testing.TB) attest.Roots {
	t.Helper()
	p, err := otherSNP()
	if err != nil {
		t.Fatal(err)
	}
	return p.Roots()
}

func newTestVerifier(t testing.TB, cfg attest.Config) *attest.Verifier {
	t.Helper()
	v, err := attest.NewVerifier(cfg)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	return v
}

// TestVerifySNPClaims checks every claim of the real Milan report, as go-sev-guest's tools show it.
func TestVerifySNPClaims(t *testing.T) {
	raw, err := os.ReadFile(realSNPReport)
	if err != nil {
		t.Fatal(err)
	}
	v := newTestVerifier(t, attest.Config{CollateralDir: realSNPCollateral, Now: func() time.Time { return realSNPTime }})
	claims, err := v.Verify(t.Context(), &attest.Evidence{Platform: attest.PlatformSEVSNP, Raw: raw}, attest.Expectation{ReportData: []byte{1, 2, 3, 4, 5}})
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	tcb := attest.SNPTCB{BootLoader: 2, TEE: 0, SNP: 5, Microcode: 68}
	want := &attest.SNPClaims{
		Product:      "Milan",
		Signer:       "vcek",
		Version:      2,
		Policy:       attest.SNPGuestPolicy{SMT: true, Debug: true},
		Measurement:  raw[0x90:0xc0],
		HostData:     make([]byte, 32),
		FamilyID:     make([]byte, 16),
		ImageID:      make([]byte, 16),
		ChipID:       raw[0x1a0:0x1e0],
		CurrentTCB:   tcb,
		ReportedTCB:  tcb,
		CommittedTCB: tcb,
		LaunchTCB:    tcb,
		TCBStatus:    "unknown",
	}
	if diff := cmp.Diff(want, claims.SNP, cmpopts.IgnoreUnexported(attest.SNPClaims{})); diff != "" {
		t.Errorf("claims (-want +got):\n%s", diff)
	}
	// The real guest is a debug guest: the baseline requirements must say so.
	err = claims.Check(attest.Requirements{SNP: attest.SNPRequirements{AllowSMT: true}})
	got := attest.Violations(err)
	if len(got) != 1 || got[0].Rule != "snp.policy.debug" {
		t.Errorf("Check on the real debug guest = %v, want one snp.policy.debug violation", err)
	}
}

func TestCheckSNP(t *testing.T) {
	measurement := bytes.Repeat([]byte{0x5a}, 48)
	hostData := bytes.Repeat([]byte{0x11}, 32)
	chipID := bytes.Repeat([]byte{0x77}, 64)
	tcb := attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 0x12}
	vmpl0, vmpl1 := uint32(0), uint32(1)

	claimsOf := func(t *testing.T, opts emulate.Options) *attest.Claims {
		p, _ := snpVariant(t, opts)
		ev := produceEvidence(t, p, snpBinding)
		c, err := newTestVerifier(t, attest.Config{Roots: []attest.Roots{p.Roots()}}).Verify(t.Context(), ev, attest.Expectation{Binding: &snpBinding})
		if err != nil {
			t.Fatalf("Verify: %v", err)
		}
		return c
	}
	good := emulate.Options{Measurement: measurement, HostData: hostData, ChipID: chipID, TCB: &tcb}
	allowSMT := attest.SNPRequirements{AllowSMT: true}

	tests := []struct {
		name string
		opts emulate.Options
		req  attest.SNPRequirements
		want []*attest.Violation
	}{
		{name: "baseline", opts: good, req: allowSMT},
		{
			name: "everything met",
			opts: good,
			req: attest.SNPRequirements{
				MinimumTCB: tcb, MinimumLaunchTCB: tcb, AllowSMT: true,
				Measurements: [][]byte{bytes.Repeat([]byte{1}, 48), measurement},
				Products:     []string{"Genoa", "Milan"}, VMPL: &vmpl0, ChipIDs: [][]byte{chipID}, HostData: hostData,
			},
		},
		{
			name: "debug guest",
			opts: emulate.Options{Debug: true},
			req:  allowSMT,
			want: []*attest.Violation{{Rule: "snp.policy.debug", Got: "debug allowed (the host can read and change the guest's memory)", Want: "debug not allowed"}},
		},
		{name: "debug guest allowed", opts: emulate.Options{Debug: true}, req: attest.SNPRequirements{AllowSMT: true, AllowDebug: true}},
		{
			name: "TCB below minimum",
			opts: good,
			req:  attest.SNPRequirements{AllowSMT: true, MinimumTCB: attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 0x14}},
			want: []*attest.Violation{{Rule: "snp.tcb.microcode", Got: "0x12", Want: "≥ 0x14"}},
		},
		{
			name: "launch TCB below minimum",
			opts: good,
			req:  attest.SNPRequirements{AllowSMT: true, MinimumLaunchTCB: attest.SNPTCB{BootLoader: 4, SNP: 9}},
			want: []*attest.Violation{
				{Rule: "snp.launchTcb.bootloader", Got: "0x03", Want: "≥ 0x04"},
				{Rule: "snp.launchTcb.snp", Got: "0x08", Want: "≥ 0x09"},
			},
		},
		{
			name: "SMT and migration agent",
			opts: emulate.Options{MigrateMA: true},
			want: []*attest.Violation{
				{Rule: "snp.policy.smt", Got: "SMT allowed", Want: "SMT not allowed"},
				{Rule: "snp.policy.migrateMA", Got: "migration agent allowed", Want: "migration agent not allowed"},
			},
		},
		{
			name: "lists and values",
			opts: good,
			req: attest.SNPRequirements{
				AllowSMT: true, Measurements: [][]byte{{1, 2}}, Products: []string{"Genoa"}, VMPL: &vmpl1,
				ChipIDs: [][]byte{{3}}, HostData: bytes.Repeat([]byte{0x22}, 32),
			},
			want: []*attest.Violation{
				{Rule: "snp.vmpl", Got: "0", Want: "1"},
				{Rule: "snp.hostData", Got: attest.HexBytes(hostData).String(), Want: attest.HexBytes(bytes.Repeat([]byte{0x22}, 32)).String()},
				{Rule: "snp.measurement", Got: attest.HexBytes(measurement).String(), Want: "one of 0102"},
				{Rule: "snp.chipId", Got: attest.HexBytes(chipID).String(), Want: "one of 03"},
				{Rule: "snp.product", Got: "Milan", Want: "one of Genoa"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := claimsOf(t, tt.opts)
			err := c.Check(attest.Requirements{SNP: tt.req})
			if diff := cmp.Diff(tt.want, attest.Violations(err)); diff != "" {
				t.Errorf("violations (-want +got):\n%s", diff)
			}
			if (err == nil) != (len(tt.want) == 0) {
				t.Errorf("Check = %v, want %d violations", err, len(tt.want))
			}
		})
	}
}

// TestVerifySNPConcurrent verifies with one Verifier from many goroutines (run with -race).
func TestVerifySNPConcurrent(t *testing.T) {
	base := baseSNP(t)
	v := newTestVerifier(t, attest.Config{Roots: []attest.Roots{base.Roots()}})
	ev := produceEvidence(t, base, snpBinding)
	bad := withRawBytes(ev, func(b []byte) []byte { b[0x90] ^= 1; return b })
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 8 {
		wg.Go(func() {
			e := ev
			if i%2 == 1 {
				e = bad
			}
			_, err := v.Verify(t.Context(), e, attest.Expectation{Binding: &snpBinding})
			if (err == nil) != (i%2 == 0) {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent Verify: unexpected result %v", err)
	}
}

// BenchmarkVerify measures verification plus the baseline requirement check, per platform.
func BenchmarkVerify(b *testing.B) {
	for _, p := range []attest.Platform{attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX} {
		b.Run(p.String(), func(b *testing.B) {
			e, err := emulate.New(p, emulate.Options{})
			if err != nil {
				b.Skipf("emulating %v: %v", p, err)
			}
			ev := produceEvidence(b, e, snpBinding)
			v := newTestVerifier(b, attest.Config{Roots: []attest.Roots{e.Roots()}})
			req := attest.Requirements{SNP: attest.SNPRequirements{AllowSMT: true}}
			for b.Loop() {
				c, err := v.Verify(b.Context(), ev, attest.Expectation{Binding: &snpBinding})
				if err != nil {
					b.Fatal(err)
				}
				if err := c.Check(req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
