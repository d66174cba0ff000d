package emulate_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

func verifySNP(t *testing.T, roots attest.Roots, raw []byte, reportData []byte) (*attest.Claims, error) {
	t.Helper()
	v, err := attest.NewVerifier(attest.Config{Roots: []attest.Roots{roots}})
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	return v.Verify(t.Context(), &attest.Evidence{Platform: attest.PlatformEmulatedSEVSNP, Raw: raw}, attest.Expectation{ReportData: reportData})
}

func TestSNPOptions(t *testing.T) {
	measurement := bytes.Repeat([]byte{0xaa}, 48)
	hostData := bytes.Repeat([]byte{0xbb}, 32)
	chipID := bytes.Repeat([]byte{0xcc}, 64)
	tcb := attest.SNPTCB{BootLoader: 4, TEE: 1, SNP: 22, Microcode: 213}
	tests := []struct {
		name string
		opts emulate.Options
		want attest.SNPClaims
	}{
		{
			name: "defaults",
			want: attest.SNPClaims{
				Product: "Milan", Signer: "vcek", Version: 3, GuestSVN: 1,
				Policy:      attest.SNPGuestPolicy{ABIMajor: 1, ABIMinor: 55, SMT: true},
				Measurement: make([]byte, 48), HostData: make([]byte, 32),
				CurrentTCB:   attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115},
				ReportedTCB:  attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115},
				CommittedTCB: attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115},
				LaunchTCB:    attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115},
				TCBStatus:    "unknown",
			},
		},
		{
			name: "everything set",
			opts: emulate.Options{
				Product: "Genoa", Measurement: measurement, TCB: &tcb, ChipID: chipID, HostData: hostData,
				VMPL: 2, Debug: true, MigrateMA: true,
			},
			want: attest.SNPClaims{
				Product: "Genoa", Signer: "vcek", Version: 3, GuestSVN: 1, VMPL: 2,
				Policy:      attest.SNPGuestPolicy{ABIMajor: 1, ABIMinor: 55, SMT: true, Debug: true, MigrateMA: true},
				Measurement: measurement, HostData: hostData, ChipID: chipID,
				CurrentTCB: tcb, ReportedTCB: tcb, CommittedTCB: tcb, LaunchTCB: tcb,
				TCBStatus: "unknown",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := emulate.New(attest.PlatformEmulatedSEVSNP, tt.opts)
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			var rd [attest.ReportDataSize]byte
			copy(rd[:], "report data")
			raw, err := p.Attest(t.Context(), rd)
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			claims, err := verifySNP(t, p.Roots(), raw, rd[:])
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			ignore := []cmp.Option{cmpopts.IgnoreUnexported(attest.SNPClaims{}), cmpopts.IgnoreFields(attest.SNPClaims{}, "FamilyID", "ImageID")}
			if tt.opts.ChipID == nil {
				ignore = append(ignore, cmpopts.IgnoreFields(attest.SNPClaims{}, "ChipID"))
			}
			if diff := cmp.Diff(&tt.want, claims.SNP, ignore...); diff != "" {
				t.Errorf("claims (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSNPBadOptions(t *testing.T) {
	tests := map[string]emulate.Options{
		"unknown product":   {Product: "Naples"},
		"short measurement": {Measurement: []byte{1, 2, 3}},
		"long host data":    {HostData: make([]byte, 33)},
		"short chip ID":     {ChipID: make([]byte, 8)},
		"VMPL out of range": {VMPL: 4},
	}
	for name, opts := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := emulate.New(attest.PlatformEmulatedSEVSNP, opts); err == nil {
				t.Errorf("New(%+v) = nil error, want one", opts)
			}
		})
	}
}

// TestSNPFreshKeys checks that two emulated platforms do not share keys: each one's evidence is
// rejected by a verifier that trusts only the other.
func TestSNPFreshKeys(t *testing.T) {
	a, err := emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if cmp.Equal(a.Roots(), b.Roots()) {
		t.Fatal("two emulated platforms have the same roots")
	}
	raw, err := a.Attest(t.Context(), [attest.ReportDataSize]byte{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = verifySNP(t, b.Roots(), raw, nil)
	if got := attest.ReasonOf(err); got != attest.ReasonChain {
		t.Errorf("verifying with another platform's roots: reason %q (%v), want %q", got, err, attest.ReasonChain)
	}
}

func TestSNPSaveOpen(t *testing.T) {
	dir := t.TempDir()
	first, err := emulate.Open(dir, attest.PlatformEmulatedSEVSNP, emulate.Options{})
	if err != nil {
		t.Fatalf("Open (new): %v", err)
	}
	for _, name := range []string{"ark.pem", "ask.pem", "vcek.pem"} {
		fi, err := os.Stat(filepath.Join(dir, "emulated-sev-snp", name))
		if err != nil {
			t.Fatal(err)
		}
		if mode := fi.Mode().Perm(); mode != 0o600 {
			t.Errorf("%s has mode %v, want 0600", name, mode)
		}
	}
	saved, err := attest.LoadRoots(dir)
	if err != nil {
		t.Fatalf("LoadRoots: %v", err)
	}
	// LoadRoots also names the folder where the emulator publishes its collateral.
	if diff := cmp.Diff([]attest.Roots{first.Roots()}, saved, cmpopts.IgnoreFields(attest.Roots{}, "CollateralDir")); diff != "" {
		t.Errorf("saved roots (-want +got):\n%s", diff)
	}

	// A second Open signs as the same platform, with new options (a new TCB means a new VCEK
	// certificate, still under the same ASK and ARK).
	tcb := attest.SNPTCB{BootLoader: 9, TEE: 9, SNP: 30, Microcode: 250}
	second, err := emulate.Open(dir, attest.PlatformEmulatedSEVSNP, emulate.Options{TCB: &tcb, Product: "Genoa"})
	if err != nil {
		t.Fatalf("Open (saved): %v", err)
	}
	if diff := cmp.Diff(first.Roots(), second.Roots()); diff != "" {
		t.Errorf("reopened platform's roots differ (-first +second):\n%s", diff)
	}
	raw, err := second.Attest(t.Context(), [attest.ReportDataSize]byte{7})
	if err != nil {
		t.Fatal(err)
	}
	claims, err := verifySNP(t, first.Roots(), raw, []byte{7})
	if err != nil {
		t.Fatalf("verifying evidence of the reopened platform with the first roots: %v", err)
	}
	if diff := cmp.Diff(tcb, claims.SNP.ReportedTCB); diff != "" {
		t.Errorf("reported TCB (-want +got):\n%s", diff)
	}
}
