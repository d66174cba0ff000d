package attest

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-sev-guest/abi"
)

func TestSNPCertExtensionsTurin(t *testing.T) {
	_, der := oakSNP(t, "turin_oc")
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	exts, err := parseSNPCertExtensions(cert, abi.VcekReportSigner)
	if err != nil {
		t.Fatalf("parseSNPCertExtensions: %v", err)
	}
	if exts.ProductName != "Turin" || len(exts.HWID) != snpTurinHWIDSize || exts.SPL[splFMC] != 0 || exts.SPL[splBootLoader] != 1 || exts.SPL[splSNP] != 2 || exts.SPL[splMicrocode] != 71 {
		t.Errorf("extensions %+v", exts)
	}
	if v, err := exts.tcbVersion("Turin"); err != nil || v != 0x4700000002000100 {
		t.Errorf("tcbVersion(Turin) = %#x, %v; want 0x4700000002000100", v, err)
	}
	if _, err := exts.tcbVersion("Milan"); err == nil || !strings.Contains(err.Error(), "fmcSPL") {
		t.Errorf("tcbVersion(Milan) of a certificate with fmcSPL = %v, want an error naming fmcSPL", err)
	}
	if _, err := parseSNPCertExtensions(cert, abi.VlekReportSigner); err == nil {
		t.Error("a VCEK's extensions read as a VLEK's")
	}
}

// FuzzSNPCertExtensions runs the KDS extension reader on arbitrary certificates: it must never
// panic, and a TCB it composes from a certificate's SPLs must read back as those SPLs.
func FuzzSNPCertExtensions(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/snp/collateral/kdsintf.amd.com/vcek/v1/*/*")
	for _, s := range seeds {
		if b, err := os.ReadFile(s); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, der []byte) {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return
		}
		for _, key := range []abi.ReportSigner{abi.VcekReportSigner, abi.VlekReportSigner} {
			exts, err := parseSNPCertExtensions(cert, key)
			if err != nil {
				continue
			}
			for _, line := range snpProductLines {
				v, err := exts.tcbVersion(line)
				if err != nil {
					continue
				}
				want := SNPTCB{BootLoader: exts.SPL[splBootLoader], TEE: exts.SPL[splTEE], SNP: exts.SPL[splSNP], Microcode: exts.SPL[splMicrocode]}
				if line == snpTurin {
					want.FMC = exts.SPL[splFMC]
				}
				if got := snpTCBOf(line, v); got != want {
					t.Errorf("%s: TCB %#x of the certificate's SPLs %v reads back as %+v, want %+v", line, v, exts.SPL, got, want)
				}
			}
		}
	})
}
