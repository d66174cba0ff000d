package attest_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-sev-guest/abi"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// azureRuntimeJSON is runtime data in the shape an Azure HCL writes it.
const azureRuntimeJSON = `{"keys":[{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"qR7L"},{"kid":"HCLEkPub","kty":"RSA","e":"AQAB","n":"0pXm"}],` +
	`"vm-configuration":{"secure-boot":true,"tpm-enabled":true,"vmUniqueId":"911B0EF8"},"user-data":"c0ffee"}`

// azureHCL wraps report (an 1184-byte SNP report) and runtime in an HCL report, as an Azure
// CVM's paravisor does, padded as Azure pads it.
func azureHCL(report, runtime []byte) []byte {
	le := binary.LittleEndian
	var b []byte
	b = append(b, "HCLA"...)
	b = le.AppendUint32(b, 2)                                 // version
	b = le.AppendUint32(b, uint32(0x20+1184+20+len(runtime))) // report size
	b = le.AppendUint32(b, 2)                                 // request type
	b = append(b, make([]byte, 16)...)                        // status, reserved
	b = append(b, report...)
	b = le.AppendUint32(b, uint32(20+len(runtime))) // data size
	b = le.AppendUint32(b, 1)                       // version
	b = le.AppendUint32(b, 2)                       // report type: SEV-SNP
	b = le.AppendUint32(b, 1)                       // hash type: SHA-256
	b = le.AppendUint32(b, uint32(len(runtime)))
	b = append(b, runtime...)
	return append(b, make([]byte, 64)...)
}

// azureSNP is the emulated SEV-SNP platform these tests sign with (making one costs two RSA keys).
var azureSNP = sync.OnceValues(func() (emulate.Platform, error) {
	return emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{})
})

// azureEmulated returns an HCL report whose SNP report an emulated platform signed over the
// digest of runtime, the certificate table that came with it, and the platform's roots.
func azureEmulated(t *testing.T, runtime []byte) (hcl, certTable []byte, roots attest.Roots) {
	t.Helper()
	p, err := azureSNP()
	if err != nil {
		t.Fatal(err)
	}
	var rd [attest.ReportDataSize]byte
	d := sha256.Sum256(runtime)
	copy(rd[:], d[:])
	raw, err := p.Attest(t.Context(), rd)
	if err != nil {
		t.Fatal(err)
	}
	return azureHCL(raw[:abi.ReportSize], runtime), raw[abi.ReportSize:], p.Roots()
}

func TestAzureHCLReport(t *testing.T) {
	hcl, table, roots := azureEmulated(t, []byte(azureRuntimeJSON))
	r, err := attest.ParseAzureHCLReport(hcl)
	if err != nil {
		t.Fatal(err)
	}
	if r.Version != 2 || r.HashType != 1 || len(r.SNPReport) != abi.ReportSize || string(r.RuntimeData) != azureRuntimeJSON {
		t.Fatalf("parsed %+v", r)
	}
	if err := r.CheckReportData(); err != nil {
		t.Errorf("CheckReportData: %v", err)
	}
	rt, err := r.Runtime()
	if err != nil {
		t.Fatal(err)
	}
	want := &attest.AzureRuntimeData{
		Keys:            []string{"HCLAkPub", "HCLEkPub"},
		VMConfiguration: json.RawMessage(`{"secure-boot":true,"tpm-enabled":true,"vmUniqueId":"911B0EF8"}`),
		UserData:        attest.HexBytes{0xc0, 0xff, 0xee},
	}
	if diff := cmp.Diff(want, rt); diff != "" {
		t.Errorf("Runtime (-want +got):\n%s", diff)
	}

	v := newTestVerifier(t, attest.Config{Roots: []attest.Roots{roots}})
	ev := &attest.Evidence{Platform: attest.PlatformEmulatedSEVSNP, Raw: append(bytes.Clone(r.SNPReport), table...)}
	if _, err := v.Verify(t.Context(), ev, attest.Expectation{ReportData: r.ReportData()}); err != nil {
		t.Errorf("verifying the SNP report inside with the runtime data's digest: %v", err)
	}

	// The keybroker verifies against a Lethe binding: an HCL report's REPORT_DATA is the digest
	// of the HCL's runtime data, so neither the report inside nor the HCL bytes themselves can
	// ever pass as migration evidence.
	b := attest.Binding{MigrationID: "mig-1", Role: attest.RoleDestination, Nonce: bytes.Repeat([]byte{1}, attest.NonceSize), HPKEPublicKey: []byte("k")}
	if _, err := v.Verify(t.Context(), ev, attest.Expectation{Binding: &b}); attest.ReasonOf(err) != attest.ReasonBinding {
		t.Errorf("the report inside with a Lethe binding: got %v, want a %s rejection", err, attest.ReasonBinding)
	}
	whole := &attest.Evidence{Platform: attest.PlatformEmulatedSEVSNP, Raw: hcl}
	if _, err := v.Verify(t.Context(), whole, attest.Expectation{Binding: &b}); attest.ReasonOf(err) != attest.ReasonMalformed {
		t.Errorf("the HCL report as evidence: got %v, want a %s rejection", err, attest.ReasonMalformed)
	}

	// Runtime data changed after signing no longer matches REPORT_DATA.
	forged := bytes.Replace(bytes.Clone(hcl), []byte(`"c0ffee"`), []byte(`"c0ffef"`), 1)
	fr, err := attest.ParseAzureHCLReport(forged)
	if err != nil {
		t.Fatal(err)
	}
	if err := fr.CheckReportData(); attest.ReasonOf(err) != attest.ReasonBinding {
		t.Errorf("changed runtime data: got %v, want a %s rejection", err, attest.ReasonBinding)
	}
}

func TestParseAzureHCLReportRefuses(t *testing.T) {
	good := azureHCL(make([]byte, abi.ReportSize), []byte(`{}`))
	set := func(off int, v uint32) []byte {
		b := bytes.Clone(good)
		binary.LittleEndian.PutUint32(b[off:], v)
		return b
	}
	tests := map[string]struct {
		in   []byte
		want string
	}{
		"not HCL":         {in: make([]byte, 4096), want: "no HCLA signature"},
		"short":           {in: good[:0x20+1184], want: "shorter than"},
		"TDX report":      {in: set(0x4c0+8, 4), want: "report type 4, not SEV-SNP"},
		"unknown hash":    {in: set(0x4c0+12, 9), want: "unknown runtime data hash type 9"},
		"runtime too big": {in: set(0x4c0+16, 1<<20), want: "does not fit"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := attest.ParseAzureHCLReport(tc.in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestParseAzureEvidence(t *testing.T) {
	hcl := azureHCL(make([]byte, abi.ReportSize), []byte(`{}`))
	ints := make([]string, len(hcl))
	for i, c := range hcl {
		ints[i] = fmt.Sprint(c)
	}
	const vcek = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
	vcekJSON, _ := json.Marshal(vcek)
	forms := map[string]string{
		"array of bytes": `{"quote":{"message":[1,2]},"report":[` + strings.Join(ints, ",") + `],"vcek":` + string(vcekJSON) + `}`,
		"base64":         `{"report":"` + base64.StdEncoding.EncodeToString(hcl) + `","vcek":` + string(vcekJSON) + `}`,
	}
	for name, in := range forms {
		t.Run(name, func(t *testing.T) {
			ev, err := attest.ParseAzureEvidence([]byte(in))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ev.Report, hcl) || string(ev.VCEK) != vcek {
				t.Errorf("got report of %d bytes, vcek %q", len(ev.Report), ev.VCEK)
			}
		})
	}
	for name, in := range map[string]string{
		"no report":       `{"vcek":"x"}`,
		"not HCL":         `{"report":[1,2,3]}`,
		"not a byte list": `{"report":[1,2,300]}`,
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := attest.ParseAzureEvidence([]byte(in)); err == nil {
				t.Error("accepted")
			}
		})
	}
}

func FuzzParseAzureHCLReport(f *testing.F) {
	f.Add(azureHCL(make([]byte, abi.ReportSize), []byte(azureRuntimeJSON)))
	f.Add([]byte("HCLA"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := attest.ParseAzureHCLReport(b)
		if err != nil {
			return
		}
		if len(r.SNPReport) != abi.ReportSize || len(r.RuntimeData) > len(b) {
			t.Fatalf("parsed %d-byte report, %d-byte runtime data from %d bytes", len(r.SNPReport), len(r.RuntimeData), len(b))
		}
		_ = r.CheckReportData()
		_, _ = r.Runtime()
	})
}
