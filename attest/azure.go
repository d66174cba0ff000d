package attest

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"strings"
)

// An Azure confidential VM does not hand its guest the SEV-SNP report directly: its paravisor
// (the HCL) returns an HCL report, which wraps the SNP report and binds the HCL's runtime data
// (the vTPM's attestation key, the VM configuration and the guest's user-data) through
// REPORT_DATA. Lethe reads it for inspection only: its REPORT_DATA is the digest of that
// runtime data, never a Lethe binding, so an HCL report can never be Lethe migration evidence.
//
// Layout, all integers little-endian:
//
//	0x000  header, 32 bytes: signature "HCLA", version, report size, request type, status,
//	       3 reserved words
//	0x020  hardware report, 1184 bytes (the SEV-SNP report)
//	0x4c0  runtime data header, 20 bytes: data size, version, report type, hash type,
//	       variable data size
//	0x4d4  variable data: the runtime data JSON, whose digest (by hash type) is REPORT_DATA
const (
	azureHCLSignature       = "HCLA"
	azureHCLHeaderSize      = 0x20
	azureHCLHWReportSize    = 1184
	azureHCLRuntimeOffset   = azureHCLHeaderSize + azureHCLHWReportSize
	azureHCLRuntimeHdrSize  = 20
	azureHCLReportTypeSNP   = 2
	azureHCLHashTypeSHA256  = 1
	azureHCLHashTypeSHA384  = 2
	azureHCLHashTypeSHA512  = 3
	azureHCLMaxRuntimeBytes = 64 << 10
)

// AzureHCLReport is a parsed Azure confidential VM HCL report. Parsing checks shape only; it
// proves nothing until the SNP report inside is verified and [AzureHCLReport.CheckReportData]
// holds.
type AzureHCLReport struct {
	// Version is the HCL report format version.
	Version uint32
	// RequestType is the kind of request the HCL answered.
	RequestType uint32
	// SNPReport is the 1184-byte SEV-SNP attestation report inside.
	SNPReport []byte
	// HashType names the digest of RuntimeData that REPORT_DATA holds: 1 SHA-256, 2 SHA-384,
	// 3 SHA-512.
	HashType uint32
	// RuntimeData is the runtime data JSON that REPORT_DATA binds.
	RuntimeData []byte
}

// IsAzureHCLReport reports whether b begins as an Azure HCL report does.
func IsAzureHCLReport(b []byte) bool {
	return len(b) >= len(azureHCLSignature) && string(b[:len(azureHCLSignature)]) == azureHCLSignature
}

// ParseAzureHCLReport parses an Azure HCL report. It returns an error for bytes that are not an
// HCL report wrapping an SEV-SNP report (a TDX HCL report included), or whose runtime data does
// not fit. Trailing bytes after the runtime data (Azure pads the report) are ignored.
func ParseAzureHCLReport(b []byte) (*AzureHCLReport, error) {
	if !IsAzureHCLReport(b) {
		return nil, errors.New("parsing Azure HCL report: no HCLA signature")
	}
	if len(b) < azureHCLRuntimeOffset+azureHCLRuntimeHdrSize {
		return nil, fmt.Errorf("parsing Azure HCL report: %d bytes, shorter than its %d-byte header, hardware report and runtime data header", len(b), azureHCLRuntimeOffset+azureHCLRuntimeHdrSize)
	}
	le := binary.LittleEndian
	r := &AzureHCLReport{
		Version:     le.Uint32(b[4:8]),
		RequestType: le.Uint32(b[12:16]),
		SNPReport:   bytes.Clone(b[azureHCLHeaderSize:azureHCLRuntimeOffset]),
	}
	rt := b[azureHCLRuntimeOffset:]
	if kind := le.Uint32(rt[8:12]); kind != azureHCLReportTypeSNP {
		return nil, fmt.Errorf("parsing Azure HCL report: report type %d, not SEV-SNP (%d)", kind, azureHCLReportTypeSNP)
	}
	r.HashType = le.Uint32(rt[12:16])
	if _, err := azureHCLHash(r.HashType); err != nil {
		return nil, fmt.Errorf("parsing Azure HCL report: %w", err)
	}
	n := le.Uint32(rt[16:20])
	if n > azureHCLMaxRuntimeBytes || int(n) > len(rt)-azureHCLRuntimeHdrSize {
		return nil, fmt.Errorf("parsing Azure HCL report: runtime data of %d bytes does not fit in the %d bytes after its header", n, len(rt)-azureHCLRuntimeHdrSize)
	}
	r.RuntimeData = bytes.Clone(rt[azureHCLRuntimeHdrSize : azureHCLRuntimeHdrSize+int(n)])
	return r, nil
}

func azureHCLHash(t uint32) (hash.Hash, error) {
	switch t {
	case azureHCLHashTypeSHA256:
		return sha256.New(), nil
	case azureHCLHashTypeSHA384:
		return sha512.New384(), nil
	case azureHCLHashTypeSHA512:
		return sha512.New(), nil
	}
	return nil, fmt.Errorf("unknown runtime data hash type %d", t)
}

// ReportData returns the REPORT_DATA the SNP report inside must carry: the digest of the
// runtime data, zero-padded to 64 bytes.
func (r *AzureHCLReport) ReportData() []byte {
	h, err := azureHCLHash(r.HashType)
	if err != nil {
		// ParseAzureHCLReport refused the report; nothing can match.
		return nil
	}
	h.Write(r.RuntimeData)
	out := make([]byte, ReportDataSize)
	copy(out, h.Sum(nil))
	return out
}

// CheckReportData checks that the SNP report inside carries [AzureHCLReport.ReportData]. It
// returns a *RejectError with ReasonBinding when it does not, ReasonMalformed when the report
// is too short to say. It does not verify the report: do that first.
func (r *AzureHCLReport) CheckReportData() error {
	if len(r.SNPReport) < snpReportDataOffset+ReportDataSize {
		return reject(ReasonMalformed, "the HCL report's hardware report is too short for REPORT_DATA")
	}
	got := r.SNPReport[snpReportDataOffset : snpReportDataOffset+ReportDataSize]
	want := r.ReportData()
	if !bytes.Equal(got, want) {
		return reject(ReasonBinding, "report data %x is not the digest of the HCL runtime data %x", got, want)
	}
	return nil
}

// snpReportDataOffset is where REPORT_DATA starts in an SEV-SNP report.
const snpReportDataOffset = 0x50

// AzureRuntimeData is what an HCL report's runtime data says, as far as an inspector needs it.
type AzureRuntimeData struct {
	// Keys are the key IDs of the JSON Web Keys the runtime data carries (HCLAkPub, the vTPM's
	// attestation key; HCLEkPub, its endorsement key).
	Keys []string `json:"keys"`
	// VMConfiguration is the VM configuration the HCL reports, as it gives it.
	VMConfiguration json.RawMessage `json:"vmConfiguration,omitempty"`
	// UserData is the guest's user-data (hex), the one value in the runtime data a guest
	// chooses.
	UserData HexBytes `json:"userData,omitempty"`
}

// Runtime parses the runtime data JSON.
func (r *AzureHCLReport) Runtime() (*AzureRuntimeData, error) {
	var raw struct {
		Keys []struct {
			KID string `json:"kid"`
		} `json:"keys"`
		VMConfiguration json.RawMessage `json:"vm-configuration"`
		UserData        string          `json:"user-data"`
	}
	if err := json.Unmarshal(r.RuntimeData, &raw); err != nil {
		return nil, fmt.Errorf("parsing Azure HCL runtime data: %w", err)
	}
	out := &AzureRuntimeData{VMConfiguration: raw.VMConfiguration}
	for _, k := range raw.Keys {
		out.Keys = append(out.Keys, k.KID)
	}
	if raw.UserData != "" {
		ud, err := hex.DecodeString(strings.TrimSpace(raw.UserData))
		if err != nil {
			return nil, fmt.Errorf("parsing Azure HCL runtime data: user-data: %w", err)
		}
		out.UserData = ud
	}
	return out, nil
}

// AzureEvidence is the JSON form in which Azure CVM attestation is commonly passed around: the
// HCL report (as a JSON array of bytes or base64) and the VCEK certificate chain (PEM). Other
// fields, such as the vTPM quote, are ignored.
type AzureEvidence struct {
	Report []byte
	VCEK   []byte
}

// ParseAzureEvidence decodes Azure evidence JSON. It returns an error for JSON without a
// "report" that is an HCL report.
func ParseAzureEvidence(b []byte) (*AzureEvidence, error) {
	if len(b) > maxEvidenceSize {
		return nil, fmt.Errorf("decoding Azure evidence: %d bytes exceeds the %d-byte limit", len(b), maxEvidenceSize)
	}
	var raw struct {
		Report json.RawMessage `json:"report"`
		VCEK   string          `json:"vcek"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("decoding Azure evidence: %w", err)
	}
	if len(raw.Report) == 0 {
		return nil, errors.New("decoding Azure evidence: no report")
	}
	ev := &AzureEvidence{VCEK: []byte(raw.VCEK)}
	// serde writes a byte vector as an array of numbers; encoding/json writes base64.
	var ints []uint8
	if err := json.Unmarshal(raw.Report, &ints); err == nil {
		ev.Report = ints
	} else if err := json.Unmarshal(raw.Report, &ev.Report); err != nil {
		return nil, fmt.Errorf("decoding Azure evidence: report is neither an array of bytes nor base64: %w", err)
	}
	if !IsAzureHCLReport(ev.Report) {
		return nil, errors.New("decoding Azure evidence: report is not an HCL report")
	}
	return ev, nil
}
