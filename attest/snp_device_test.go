package attest

import (
	"testing"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/uuid"
)

// vlekHost is a guest device whose host provisioned a VLEK: it returns a real VLEK-signed
// report with the certificate table of the extended report, as go-sev-guest's client returns
// it (the host's table plus the extra platform info entry it mixes in).
type vlekHost struct{ report, table []byte }

func (h vlekHost) GetRawQuote([64]byte) ([]byte, error) {
	table, err := abi.ExtendedPlatformCertTable(h.table)
	if err != nil {
		return nil, err
	}
	return append(append([]byte(nil), h.report...), table...), nil
}

// TestSNPAttesterPassesVLEK checks that an agent's evidence carries the VLEK its host
// provisioned to where a verifier finds it: S2, attested through SNPAttester, verifies as
// VLEK-signed with no --vlek and no cache.
func TestSNPAttesterPassesVLEK(t *testing.T) {
	report := realEvidence(t, trusteeSNP+"test-vlek-report.bin")
	vlek := realEvidence(t, trusteeSNP+"test-vlek.der")
	host := abi.CertTable{Entries: []abi.CertTableEntry{{GUID: uuid.MustParse(abi.VlekGUID), RawCert: vlek}}}
	a := &SNPAttester{qp: vlekHost{report: report, table: host.Marshal()}}
	raw, err := a.Attest(t.Context(), [ReportDataSize]byte{})
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	claims, err := verifyReal(t, Config{Now: at("2025-06-01")}, raw, Expectation{SkipReportData: true})
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if claims.SNP.Signer != "vlek" {
		t.Errorf("signer %q, want vlek", claims.SNP.Signer)
	}
}
