package attest

import (
	"bytes"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
)

// snpSeeds are the fuzz seeds of the SEV-SNP parsers: a real report without a certificate
// table and emulated evidence with one, whole and cut.
func snpSeeds(f *testing.F) [][]byte {
	f.Helper()
	var seeds [][]byte
	for _, name := range []string{"testdata/snp/milan-v2-report.bin", "testdata/snp/emulated-evidence.bin"} {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b, b[:abi.ReportSize], b[:len(b)-1])
	}
	return append(seeds, nil, make([]byte, abi.ReportSize+abi.CertTableEntrySize))
}

// FuzzParseSNPEvidence checks that the report and certificate table parser never panics and
// that what it accepts holds together.
func FuzzParseSNPEvidence(f *testing.F) {
	for _, s := range snpSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		ev, err := parseSNPEvidence(raw)
		if err != nil {
			return
		}
		if len(ev.raw) != abi.ReportSize || !bytes.Equal(ev.raw, raw[:abi.ReportSize]) {
			t.Fatalf("parsed report is not the first %d bytes of the evidence", abi.ReportSize)
		}
		for _, e := range ev.certs.Entries {
			if len(e.RawCert) > len(raw) {
				t.Fatalf("certificate entry of %d bytes from %d bytes of evidence", len(e.RawCert), len(raw))
			}
		}
	})
}

// realSNPTime is a time at which both the real report's VCEK and the emulated evidence's are
// valid.
var realSNPTime = time.Date(2027, time.June, 1, 0, 0, 0, 0, time.UTC)

// FuzzVerifySNP checks that verification of arbitrary bytes, against AMD's roots and against
// emulated roots, never panics and rejects with a reason.
func FuzzVerifySNP(f *testing.F) {
	for _, s := range snpSeeds(f) {
		f.Add(s, false)
		f.Add(s, true)
	}
	// The roots of the emulated platform that made emulated-evidence.bin.
	roots, err := LoadRoots("testdata/snp/emulated-roots")
	if err != nil {
		f.Fatal(err)
	}
	v, err := newSNPVerifier(Config{Roots: roots, Now: func() time.Time { return realSNPTime }}, newCollateralCache("testdata/snp/collateral", false))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw []byte, emulated bool) {
		p := PlatformSEVSNP
		if emulated {
			p = PlatformEmulatedSEVSNP
		}
		_, err := v.verify(t.Context(), p, raw)
		if err == nil {
			return
		}
		if ReasonOf(err) == "" {
			t.Fatalf("verify error without a reason: %v", err)
		}
	})
}

// FuzzParseEvidence checks that decoding evidence JSON never panics and that what it accepts
// encodes and decodes to the same evidence.
func FuzzParseEvidence(f *testing.F) {
	b, err := os.ReadFile("testdata/snp/emulated-evidence.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{"platform":"sev-snp","raw":"AAEC","hpkePublicKey":"AQI=","statement":{"zeroed":true}}`))
	f.Add([]byte(`{"platform":"emulated-tdx","raw":""}`))
	f.Add([]byte(`{"platform":"nonsense","raw":"AA=="}`))
	f.Add([]byte(`{"platform":"tdx","raw":"AA==","statement":"{"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := ParseEvidence(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(ev)
		if err != nil {
			t.Fatalf("encoding accepted evidence: %v", err)
		}
		ev2, err := ParseEvidence(again)
		if err != nil {
			t.Fatalf("decoding re-encoded evidence: %v", err)
		}
		if ev2.Platform != ev.Platform || !bytes.Equal(ev2.Raw, ev.Raw) || !bytes.Equal(ev2.HPKEPublicKey, ev.HPKEPublicKey) {
			t.Fatalf("evidence changed through encoding: %+v, then %+v", ev, ev2)
		}
	})
}

// TestSNPFuzzSeedsVerify checks that the fuzz seeds reach verification's end: the untouched
// real and emulated evidence verify, so the fuzzer starts from the paths that matter.
func TestSNPFuzzSeedsVerify(t *testing.T) {
	roots, err := LoadRoots("testdata/snp/emulated-roots")
	if err != nil {
		t.Fatal(err)
	}
	v, err := newSNPVerifier(Config{Roots: roots, Now: func() time.Time { return realSNPTime }}, newCollateralCache("testdata/snp/collateral", false))
	if err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]Platform{
		"testdata/snp/milan-v2-report.bin":   PlatformSEVSNP,
		"testdata/snp/emulated-evidence.bin": PlatformEmulatedSEVSNP,
	} {
		raw, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.verify(t.Context(), p, raw); err != nil {
			t.Errorf("verifying %s as %v: %v", name, p, err)
		}
	}
}
