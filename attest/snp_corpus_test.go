package attest

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-sev-guest/abi"
	"github.com/google/uuid"

	"github.com/lethe-cc/lethe/internal/evidencetest"
)

// Real SEV-SNP evidence captured on hardware by other projects is not part of the repository:
// these tests read it through package evidencetest (LETHE_EVIDENCE_DIR), laid out as
// <owner>_<repo>/<path in that repository>, and skip where it is absent, failing instead
// when CI=true. Comments and test names number the captures (S1 to S20) as the corpus's
// SOURCES.md does.

func realEvidence(t testing.TB, rel string) []byte { return evidencetest.Read(t, rel) }

// protoField returns the first length-delimited field at path (field numbers, outermost
// first) of a protobuf message, walking its wire format; nil if there is none.
func protoField(t testing.TB, msg []byte, path ...uint64) []byte {
	t.Helper()
	b := msg
	for _, want := range path {
		var found []byte
		for len(b) > 0 && found == nil {
			key, n := binary.Uvarint(b)
			if n <= 0 {
				t.Fatalf("protobuf: bad field key")
			}
			b = b[n:]
			var skip uint64
			switch key & 7 {
			case 0:
				_, n := binary.Uvarint(b)
				if n <= 0 {
					t.Fatalf("protobuf: bad varint")
				}
				skip = uint64(n)
			case 1:
				skip = 8
			case 5:
				skip = 4
			case 2:
				l, n := binary.Uvarint(b)
				if n <= 0 || l > uint64(len(b)-n) {
					t.Fatalf("protobuf: bad length")
				}
				if key>>3 == want {
					found = b[n : n+int(l)]
				}
				skip = uint64(n) + l
			default:
				t.Fatalf("protobuf: wire type %d", key&7)
			}
			if skip > uint64(len(b)) {
				t.Fatalf("protobuf: field runs past the message")
			}
			b = b[skip:]
		}
		if found == nil {
			return nil
		}
		b = found
	}
	return b
}

const oakTestdata = "project-oak_oak/oak_attestation_verification/testdata/"

// oakSNP returns the SEV-SNP report (Evidence.root_layer.remote_attestation_report) and VCEK
// (Endorsements.{oak_containers,oak_restricted_kernel}.root_layer.tee_certificate) of an Oak
// capture.
func oakSNP(t testing.TB, name string) (report, vcek []byte) {
	t.Helper()
	report = protoField(t, realEvidence(t, oakTestdata+name+"_evidence.binarypb"), 1, 2)
	endorsements := realEvidence(t, oakTestdata+name+"_endorsements.binarypb")
	if vcek = protoField(t, endorsements, 2, 1, 1); vcek == nil {
		vcek = protoField(t, endorsements, 1, 1, 1)
	}
	if len(report) != abi.ReportSize || vcek == nil {
		t.Fatalf("%s: report of %d bytes, VCEK of %d bytes", name, len(report), len(vcek))
	}
	return report, vcek
}

// withCert returns report followed by a certificate table holding der under guid.
func withCert(report, der []byte, guid string) []byte {
	table := abi.CertTable{Entries: []abi.CertTableEntry{{GUID: uuid.MustParse(guid), RawCert: der}}}
	return append(bytes.Clone(report), table.Marshal()...)
}

func derOf(t testing.TB, b []byte) []byte {
	t.Helper()
	if block, _ := pem.Decode(b); block != nil {
		return block.Bytes
	}
	return b
}

func verifyReal(t *testing.T, cfg Config, raw []byte, want Expectation) (*Claims, error) {
	t.Helper()
	v, err := NewVerifier(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return v.Verify(t.Context(), &Evidence{Platform: PlatformSEVSNP, Raw: raw}, want)
}

func at(s string) func() time.Time {
	tm, err := time.Parse(time.DateOnly, s)
	if err != nil {
		panic(err)
	}
	return func() time.Time { return tm }
}

func TestSNPTCBLayouts(t *testing.T) {
	// Turin: fmc, bl, tee, snp in bytes 0 to 3, ucode in byte 7 (S16's TCB_VERSION, as
	// stored little-endian in the report: 00 01 00 02 00 00 00 47).
	const turin = 0x4700000002000100
	if got, want := snpTCBOf("Turin", turin), (SNPTCB{FMC: 0, BootLoader: 1, TEE: 0, SNP: 2, Microcode: 71}); got != want {
		t.Errorf("Turin TCB %#x = %+v, want %+v", uint64(turin), got, want)
	}
	// Milan and Genoa: bl, tee in bytes 0 and 1, snp in byte 6, ucode in byte 7.
	const milan = 0xdb18000000000004
	if got, want := snpTCBOf("Milan", milan), (SNPTCB{BootLoader: 4, SNP: 0x18, Microcode: 0xdb}); got != want {
		t.Errorf("Milan TCB %#x = %+v, want %+v", uint64(milan), got, want)
	}
	for _, line := range []string{"Milan", "Genoa", "Turin"} {
		tcb := SNPTCB{BootLoader: 1, TEE: 2, SNP: 3, Microcode: 4}
		if line == "Turin" {
			tcb.FMC = 5
		}
		if got := snpTCBOf(line, snpTCBVersion(line, tcb)); got != tcb {
			t.Errorf("%s: snpTCBOf(snpTCBVersion(%+v)) = %+v", line, tcb, got)
		}
	}
}

func TestSNPKDSURLs(t *testing.T) {
	chip := make([]byte, abi.ChipIDSize)
	copy(chip, []byte{0x3b, 0x42, 0x09, 0x2f, 0x69, 0xc6, 0x56, 0xd3})
	tests := []struct {
		name, got, want string
	}{
		// AMD's URL of S16's VCEK, parameters in AMD's order.
		{"Turin VCEK", snpVCEKURL("Turin", chip, 0x4700000002000100), "https://kdsintf.amd.com/vcek/v1/Turin/3b42092f69c656d3?ucodeSPL=71&snpSPL=2&teeSPL=0&blSPL=1&fmcSPL=0"},
		{"Genoa VCEK", snpVCEKURL("Genoa", chip[:8], 0x5419000000000a00), "https://kdsintf.amd.com/vcek/v1/Genoa/3b42092f69c656d3?blSPL=0&teeSPL=10&snpSPL=25&ucodeSPL=84"},
		{"Milan VLEK", snpVLEKURL("Milan", 0xd918000000000004), "https://kdsintf.amd.com/vlek/v1/Milan/cert?blSPL=4&teeSPL=0&snpSPL=24&ucodeSPL=217"},
		{"Turin VLEK", snpVLEKURL("Turin", 0x4700000002000100), "https://kdsintf.amd.com/vlek/v1/Turin/cert?ucodeSPL=71&snpSPL=2&teeSPL=0&blSPL=1&fmcSPL=0"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: %s, want %s", tt.name, tt.got, tt.want)
		}
	}
}

// reportedTCBBytes reads S16-style REPORTED_TCB (offset 0x180) straight from the report bytes
// in Turin's layout, apart from the code under test.
func turinReportedTCB(report []byte) SNPTCB {
	b := report[0x180:0x188]
	return SNPTCB{FMC: b[0], BootLoader: b[1], TEE: b[2], SNP: b[3], Microcode: b[7]}
}

func TestVerifyRealTurin(t *testing.T) {
	report, vcek := oakSNP(t, "turin_oc")
	raw := withCert(report, vcek, abi.VcekGUID)
	wantTCB := SNPTCB{FMC: 0, BootLoader: 1, TEE: 0, SNP: 2, Microcode: 71}
	if got := turinReportedTCB(report); got != wantTCB {
		t.Fatalf("S16's REPORTED_TCB bytes say %+v, want %+v", got, wantTCB)
	}

	claims, err := verifyReal(t, Config{Now: at("2025-10-01")}, raw, Expectation{SkipReportData: true})
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	c := claims.SNP
	if c.Product != "Turin" || c.Signer != "vcek" || c.Version != 5 {
		t.Errorf("claims: product %q, signer %q, version %d; want Turin, vcek, 5", c.Product, c.Signer, c.Version)
	}
	for name, got := range map[string]SNPTCB{"reported": c.ReportedTCB, "current": c.CurrentTCB, "committed": c.CommittedTCB, "launch": c.LaunchTCB} {
		if diff := cmp.Diff(wantTCB, got); diff != "" {
			t.Errorf("%s TCB (-want +got):\n%s", name, diff)
		}
	}

	t.Run("requirements", func(t *testing.T) {
		met := SNPRequirements{MinimumTCB: wantTCB, MinimumLaunchTCB: wantTCB, AllowSMT: true}
		if err := claims.Check(Requirements{SNP: met}); err != nil {
			t.Errorf("Check(met requirements) = %v", err)
		}
		unmet := met
		unmet.MinimumTCB.FMC, unmet.MinimumTCB.Microcode = 1, 72
		unmet.AllowSMT = false
		var rules []string
		for _, v := range Violations(claims.Check(Requirements{SNP: unmet})) {
			rules = append(rules, v.Rule)
		}
		if diff := cmp.Diff([]string{"snp.tcb.fmc", "snp.tcb.microcode", "snp.policy.smt"}, rules); diff != "" {
			t.Errorf("violations (-want +got):\n%s", diff)
		}
	})

	_, genoaVCEK := oakSNP(t, "genoa_oc")
	flipped := bytes.Clone(raw)
	flipped[0x50] ^= 1 // REPORT_DATA
	cache := t.TempDir()
	// The cache keeps S16's VCEK under AMD's own URL for it.
	p := filepath.Join(cache, "kdsintf.amd.com", "vcek", "v1", "Turin", "3b42092f69c656d3@ucodeSPL=71&snpSPL=2&teeSPL=0&blSPL=1&fmcSPL=0")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, vcek, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		cfg        Config
		raw        []byte
		wantReason Reason
		wantText   string
	}{
		{name: "VCEK from the collateral cache", cfg: Config{Now: at("2025-10-01"), CollateralDir: cache}, raw: report},
		{name: "REPORT_DATA bit flipped", cfg: Config{Now: at("2025-10-01")}, raw: flipped, wantReason: ReasonSignature},
		{name: "a Genoa chip's VCEK", cfg: Config{Now: at("2025-10-01")}, raw: withCert(report, genoaVCEK, abi.VcekGUID), wantReason: ReasonSignature},
		{name: "before the VCEK was issued", cfg: Config{Now: at("2025-01-01")}, raw: raw, wantReason: ReasonExpired},
		{name: "--product contradicting the report", cfg: Config{Now: at("2025-10-01"), ProductLine: "Milan"}, raw: raw, wantReason: ReasonChain, wantText: "from a Turin machine (CPUID 0x00b00f21), not Milan"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := verifyReal(t, tt.cfg, tt.raw, Expectation{SkipReportData: true})
			if got := ReasonOf(err); got != tt.wantReason {
				t.Fatalf("Verify = %v; reason %q, want %q", err, got, tt.wantReason)
			}
			if err != nil && !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("Verify = %v, want it to say %q", err, tt.wantText)
			}
		})
	}
}

// TestVerifyRealMilanGenoa keeps the lines go-sev-guest handles itself verifying as before.
func TestVerifyRealMilanGenoa(t *testing.T) {
	for _, tt := range []struct {
		name, product string
		version       uint32
	}{
		{"genoa_oc", "Genoa", 5},
		{"milan_oc_release", "Milan", 3},
		{"milan_rk_release", "Milan", 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			report, vcek := oakSNP(t, tt.name)
			claims, err := verifyReal(t, Config{Now: at("2025-10-01")}, withCert(report, vcek, abi.VcekGUID), Expectation{SkipReportData: true})
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if claims.SNP.Product != tt.product || claims.SNP.Version != tt.version || claims.SNP.ReportedTCB.FMC != 0 {
				t.Errorf("claims: product %q, version %d, fmc %d; want %s, %d, 0", claims.SNP.Product, claims.SNP.Version, claims.SNP.ReportedTCB.FMC, tt.product, tt.version)
			}
			// Bytes 0, 1, 6, 7 of REPORTED_TCB are bl, tee, snp, ucode before Turin.
			b := report[0x180:0x188]
			if want := (SNPTCB{BootLoader: b[0], TEE: b[1], SNP: b[6], Microcode: b[7]}); claims.SNP.ReportedTCB != want {
				t.Errorf("reported TCB %+v, want %+v", claims.SNP.ReportedTCB, want)
			}
		})
	}
}

const (
	trusteeSNP       = "confidential-containers_trustee/deps/verifier/test_data/snp/"
	constellationSNP = "edgelesssys_constellation/internal/attestation/"
)

func TestVerifyRealVLEK(t *testing.T) {
	s2 := realEvidence(t, trusteeSNP+"test-vlek-report.bin")
	s2VLEK := derOf(t, realEvidence(t, trusteeSNP+"test-vlek.der"))
	s11, err := hex.DecodeString(strings.TrimSpace(string(realEvidence(t, constellationSNP+"snp/testdata/AttestationReportVLEK.hex"))))
	if err != nil {
		t.Fatal(err)
	}
	s11VLEK := derOf(t, realEvidence(t, constellationSNP+"snp/testdata/vlek.pem"))
	s12, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(realEvidence(t, constellationSNP+"aws/snp/testdata/report.txt"))))
	if err != nil {
		t.Fatal(err)
	}
	s12VLEK := derOf(t, realEvidence(t, constellationSNP+"aws/snp/testdata/vlek.pem"))
	// S12's REPORT_DATA is the AK digest 87ab7c…0db2f.
	akDigest := s12[0x50:0x90]
	if h := hex.EncodeToString(akDigest); !strings.HasPrefix(h, "87ab7c") || !strings.HasSuffix(h, "0db2f") {
		t.Fatalf("S12's REPORT_DATA is %s, not the AK digest", h)
	}

	// A VLEK in the collateral cache, under the name documented for it (product line and
	// REPORTED_TCB: bl 4, tee 0, snp 24, ucode 217).
	cache := t.TempDir()
	p := filepath.Join(cache, "kdsintf.amd.com", "vlek", "v1", "Milan", "cert@blSPL=4&teeSPL=0&snpSPL=24&ucodeSPL=217")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, s2VLEK, 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name       string
		cfg        Config
		raw        []byte
		want       Expectation
		wantReason Reason
	}{
		{name: "S2 with its VLEK", cfg: Config{Now: at("2025-06-01")}, raw: withCert(s2, s2VLEK, abi.VlekGUID)},
		{name: "S2 with its VLEK from the collateral cache", cfg: Config{Now: at("2025-06-01"), CollateralDir: cache}, raw: s2},
		{name: "S2 with no VLEK anywhere", cfg: Config{Now: at("2025-06-01"), CollateralDir: t.TempDir()}, raw: s2, wantReason: ReasonCollateral},
		{name: "S2 after the VLEK expired", cfg: Config{Now: at("2026-01-01")}, raw: withCert(s2, s2VLEK, abi.VlekGUID), wantReason: ReasonExpired},
		{name: "S11 with a VLEK that did not sign it", cfg: Config{Now: at("2024-01-01")}, raw: withCert(s11, s11VLEK, abi.VlekGUID), wantReason: ReasonSignature},
		{name: "S12 bound to its AK digest", cfg: Config{Now: at("2025-06-01")}, raw: withCert(s12, s12VLEK, abi.VlekGUID), want: Expectation{ReportData: akDigest}},
		{name: "S12 and another REPORT_DATA", cfg: Config{Now: at("2025-06-01")}, raw: withCert(s12, s12VLEK, abi.VlekGUID), want: Expectation{ReportData: []byte{0x12, 0x3a, 0xbc}}, wantReason: ReasonBinding},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := tt.want
			if want.ReportData == nil {
				want.SkipReportData = true
			}
			claims, err := verifyReal(t, tt.cfg, tt.raw, want)
			if got := ReasonOf(err); got != tt.wantReason {
				t.Fatalf("Verify = %v; reason %q, want %q", err, got, tt.wantReason)
			}
			if err == nil && (claims.SNP.Signer != "vlek" || claims.SNP.Product != "Milan") {
				t.Errorf("claims: signer %q, product %q; want vlek, Milan", claims.SNP.Signer, claims.SNP.Product)
			}
		})
	}
}

// TestAMDTurinRoots checks the Turin ARK, ASK and ASVK Lethe trusts (go-sev-guest's) against
// the ones another project pins, by fingerprint.
func TestAMDTurinRoots(t *testing.T) {
	pems := realEvidence(t, "confidential-containers_trustee/deps/verifier/src/snp/turin_ask_ark_asvk.pem")
	want := map[string]string{}
	for rest := pems; ; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		want[c.Subject.CommonName] = hex.EncodeToString(fingerprint(c))
	}
	v, err := newSNPVerifier(Config{}, newCollateralCache("", false))
	if err != nil {
		t.Fatal(err)
	}
	roots := v.amd["Turin"]
	if len(roots) != 1 {
		t.Fatalf("%d Turin roots, want 1", len(roots))
	}
	got := map[string]string{}
	for _, c := range []*x509.Certificate{roots[0].Ark, roots[0].Ask, roots[0].Asvk} {
		got[c.Subject.CommonName] = hex.EncodeToString(fingerprint(c))
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Turin roots by common name, SHA-256 fingerprints (-pinned elsewhere +Lethe's):\n%s", diff)
	}
	for _, cn := range []string{"ARK-Turin", "SEV-Turin", "SEV-VLEK-Turin"} {
		if got[cn] == "" {
			t.Errorf("no %s among Lethe's Turin roots", cn)
		}
	}
}

func fingerprint(c *x509.Certificate) []byte {
	h := sha256.Sum256(c.Raw)
	return h[:]
}
