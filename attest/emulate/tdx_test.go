package emulate_test

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	tdxverify "github.com/google/go-tdx-guest/verify"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// pcsGetter serves an emulator's collateral to go-tdx-guest directly, without Lethe's verifier.
type pcsGetter map[string][]byte

func (g pcsGetter) Get(u string) (map[string][]string, []byte, error) {
	body, ok := g[u]
	if !ok {
		return nil, nil, fmt.Errorf("404: %s", u)
	}
	var h struct {
		Headers map[string][]string `json:"headers"`
	}
	if hb, ok := g[u+attest.CollateralHeadersSuffix]; ok {
		if err := json.Unmarshal(hb, &h); err != nil {
			return nil, nil, err
		}
	}
	return h.Headers, body, nil
}

// libraryVerify verifies raw with go-tdx-guest's own verify, collateral and revocations
// included, against the roots' certificate only.
func libraryVerify(t *testing.T, r attest.Roots, raw []byte) error {
	t.Helper()
	pool := x509.NewCertPool()
	for _, p := range r.Certificates {
		if !pool.AppendCertsFromPEM(p) {
			t.Fatalf("roots hold no PEM certificate")
		}
	}
	return tdxverify.RawTdxQuote(raw, &tdxverify.Options{
		GetCollateral:    true,
		CheckRevocations: true,
		Getter:           pcsGetter(r.Collateral),
		Now:              time.Now(),
		TrustedRoots:     pool,
	})
}

func quoteOf(t *testing.T, raw []byte) *pb.QuoteV4 {
	t.Helper()
	q, err := abi.QuoteToProto(raw)
	if err != nil {
		t.Fatalf("parsing quote: %v", err)
	}
	return q.(*pb.QuoteV4)
}

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func TestTDXQuoteVerifiesWithGoTDXGuest(t *testing.T) {
	tests := map[string]emulate.Options{
		"defaults": {},
		"settable": {
			MRTD:      fill(0xaa, 48),
			RTMRs:     [4][]byte{fill(1, 48), fill(2, 48), fill(3, 48), fill(4, 48)},
			TEETCBSVN: []byte{7, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
			FMSPC:     []byte{0x50, 0x80, 0x6f, 0, 0, 0},
			MRSEAM:    fill(0x5e, 48),
			Debug:     true,
		},
		"measurement as MRTD": {Measurement: fill(0xbb, 48)},
	}
	for name, opts := range tests {
		t.Run(name, func(t *testing.T) {
			e, err := emulate.New(attest.PlatformEmulatedTDX, opts)
			if err != nil {
				t.Fatal(err)
			}
			rd := [64]byte{1, 2, 3}
			raw, err := e.Attest(t.Context(), rd)
			if err != nil {
				t.Fatal(err)
			}
			if err := libraryVerify(t, e.Roots(), raw); err != nil {
				t.Fatalf("go-tdx-guest rejects the emulated quote: %v", err)
			}
			b := quoteOf(t, raw).GetTdQuoteBody()
			if diff := cmp.Diff(rd[:], b.GetReportData()); diff != "" {
				t.Errorf("report data (-want +got):\n%s", diff)
			}
			if opts.MRTD != nil && !bytes.Equal(b.GetMrTd(), opts.MRTD) {
				t.Errorf("MRTD = %x, want %x", b.GetMrTd(), opts.MRTD)
			}
			if opts.Measurement != nil && !bytes.Equal(b.GetMrTd(), opts.Measurement) {
				t.Errorf("MRTD = %x, want the measurement %x", b.GetMrTd(), opts.Measurement)
			}
			for i, r := range opts.RTMRs {
				if r != nil && !bytes.Equal(b.GetRtmrs()[i], r) {
					t.Errorf("RTMR%d = %x, want %x", i, b.GetRtmrs()[i], r)
				}
			}
			if opts.TEETCBSVN != nil && !bytes.Equal(b.GetTeeTcbSvn(), opts.TEETCBSVN) {
				t.Errorf("TEE TCB SVN = %x, want %x", b.GetTeeTcbSvn(), opts.TEETCBSVN)
			}
			if opts.MRSEAM != nil && !bytes.Equal(b.GetMrSeam(), opts.MRSEAM) {
				t.Errorf("MRSEAM = %x, want %x", b.GetMrSeam(), opts.MRSEAM)
			}
			if got := b.GetTdAttributes()[0]&1 == 1; got != opts.Debug {
				t.Errorf("debug bit = %v, want %v", got, opts.Debug)
			}
			if opts.FMSPC != nil {
				if _, ok := e.Roots().Collateral["https://api.trustedservices.intel.com/tdx/certification/v4/tcb?fmspc="+hex.EncodeToString(opts.FMSPC)]; !ok {
					t.Errorf("no TCB info served for FMSPC %x", opts.FMSPC)
				}
			}
		})
	}
}

func TestTDXFreshKeysPerPlatform(t *testing.T) {
	a, err := emulate.New(attest.PlatformEmulatedTDX, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := emulate.New(attest.PlatformEmulatedTDX, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a.Roots().Certificates["root"], b.Roots().Certificates["root"]) {
		t.Fatal("two emulated platforms share a root")
	}
	raw, err := a.Attest(t.Context(), [64]byte{})
	if err != nil {
		t.Fatal(err)
	}
	if err := libraryVerify(t, b.Roots(), raw); err == nil {
		t.Fatal("a quote verifies under another emulated platform's roots")
	}
}

func TestTDXBadOptions(t *testing.T) {
	tests := map[string]emulate.Options{
		"short MRTD":      {MRTD: []byte{1}},
		"long FMSPC":      {FMSPC: fill(1, 7)},
		"short RTMR":      {RTMRs: [4][]byte{nil, nil, fill(1, 47), nil}},
		"short TEETCBSVN": {TEETCBSVN: fill(1, 15)},
		"short MRSEAM":    {MRSEAM: fill(1, 32)},
	}
	for name, opts := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := emulate.New(attest.PlatformEmulatedTDX, opts); err == nil {
				t.Fatal("New accepted a field of the wrong size")
			}
		})
	}
}

func TestTDXRevokePCK(t *testing.T) {
	p, err := emulate.New(attest.PlatformEmulatedTDX, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := p.(*emulate.TDX)
	raw, err := e.Attest(t.Context(), [64]byte{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.RevokePCK(); err != nil {
		t.Fatal(err)
	}
	err = libraryVerify(t, e.Roots(), raw)
	if err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("verifying with the PCK revoked: %v, want a revocation error", err)
	}
}

func TestTDXSaveOpen(t *testing.T) {
	dir := t.TempDir()
	first, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pdir := filepath.Join(dir, "emulated-tdx")
	keys, err := filepath.Glob(filepath.Join(pdir, "*.key"))
	if err != nil || len(keys) == 0 {
		t.Fatalf("no keys saved under %s (%v)", pdir, err)
	}
	for _, k := range keys {
		st, err := os.Stat(k)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", k, st.Mode().Perm())
		}
	}

	// Opening again signs as the same platform, with new options.
	fmspc := []byte{0x00, 0x90, 0x6e, 0xa1, 0, 0}
	second, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{FMSPC: fmspc, Debug: true})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first.Roots().Certificates, second.Roots().Certificates); diff != "" {
		t.Errorf("reopened platform has other roots (-first +second):\n%s", diff)
	}
	saved, err := attest.LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(saved) != 1 {
		t.Fatalf("LoadRoots = %d roots, want 1", len(saved))
	}
	for name, e := range map[string]emulate.Platform{"first": first, "second": second} {
		raw, err := e.Attest(t.Context(), [64]byte{9})
		if err != nil {
			t.Fatal(err)
		}
		if err := libraryVerify(t, saved[0], raw); err != nil {
			t.Errorf("%s platform's quote does not verify with the saved roots: %v", name, err)
		}
	}
	raw, err := second.Attest(t.Context(), [64]byte{})
	if err != nil {
		t.Fatal(err)
	}
	chain := quoteOf(t, raw).GetSignedData().GetCertificationData().GetQeReportCertificationData().GetPckCertificateChainData().GetPckCertChain()
	blk, _ := pem.Decode(chain)
	if blk == nil {
		t.Fatal("no PCK certificate in the quote")
	}
	if !bytes.Contains(blk.Bytes, fmspc) {
		t.Errorf("reopened platform's PCK certificate does not carry FMSPC %x", fmspc)
	}

	// A corrupted key is an error, not a new platform.
	if err := os.WriteFile(filepath.Join(pdir, "pck.key"), []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{}); err == nil {
		t.Error("Open succeeded with a corrupted key")
	}
}

func TestTDXRevocationSurvivesOpen(t *testing.T) {
	dir := t.TempDir()
	p, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.(*emulate.TDX).RevokePCK(); err != nil {
		t.Fatal(err)
	}
	if err := p.Save(dir); err != nil {
		t.Fatal(err)
	}
	reopened, err := emulate.Open(dir, attest.PlatformEmulatedTDX, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := reopened.Attest(t.Context(), [64]byte{})
	if err != nil {
		t.Fatal(err)
	}
	if err := libraryVerify(t, reopened.Roots(), raw); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("verifying after reopening a revoked platform: %v, want a revocation error", err)
	}
}
