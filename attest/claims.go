package attest

import (
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// HexBytes is a byte string that encodes as lowercase hex in JSON and YAML.
type HexBytes []byte

// String returns the bytes as lowercase hex.
func (h HexBytes) String() string { return hex.EncodeToString(h) }

// MarshalText implements encoding.TextMarshaler.
func (h HexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

// UnmarshalText implements encoding.TextUnmarshaler. It accepts an optional 0x prefix.
func (h *HexBytes) UnmarshalText(b []byte) error {
	s := strings.TrimPrefix(strings.TrimPrefix(string(b), "0x"), "0X")
	v, err := hex.DecodeString(s)
	if err != nil {
		return fmt.Errorf("decoding hex: %w", err)
	}
	*h = v
	return nil
}

// Claims are what verified evidence says, normalized across platforms. Exactly one of SNP and
// TDX is set, according to Platform. Policy is evaluated on claims only.
type Claims struct {
	Platform Platform `json:"platform"`
	// EvidenceDigest is SHA-256 of the raw attestation bytes.
	EvidenceDigest HexBytes `json:"evidenceDigest"`
	// ReportData is the 64-byte REPORT_DATA the platform signed.
	ReportData HexBytes `json:"reportData"`
	// HPKEPublicKey and Statement are the evidence's, now proven bound to the report (when the
	// verifier checked the binding).
	HPKEPublicKey HexBytes `json:"hpkePublicKey,omitempty"`
	Statement     []byte   `json:"statement,omitempty"`

	SNP *SNPClaims `json:"snp,omitempty"`
	TDX *TDXClaims `json:"tdx,omitempty"`
}

// SNPTCB is an SEV-SNP TCB version, component by component. Where each component sits in the
// 64-bit TCB_VERSION depends on the product line: Turin added FMC and moved the others (see
// snpTCBOf); the components mean the same on every line.
type SNPTCB struct {
	// FMC is the security patch level of the first mutable code, from Turin on; always 0 on
	// Milan and Genoa, which have none.
	FMC        uint8 `json:"fmc" yaml:"fmc,omitempty"`
	BootLoader uint8 `json:"bl" yaml:"bl"`
	TEE        uint8 `json:"tee" yaml:"tee"`
	SNP        uint8 `json:"snp" yaml:"snp"`
	Microcode  uint8 `json:"ucode" yaml:"ucode"`
}

// String formats the TCB as bl=N,tee=N,snp=N,ucode=N, preceded by fmc=N, when FMC is not 0.
func (t SNPTCB) String() string {
	s := fmt.Sprintf("bl=%d,tee=%d,snp=%d,ucode=%d", t.BootLoader, t.TEE, t.SNP, t.Microcode)
	if t.FMC != 0 {
		s = fmt.Sprintf("fmc=%d,", t.FMC) + s
	}
	return s
}

// ParseSNPTCB parses the form String writes, [fmc=N,]bl=N,tee=N,snp=N,ucode=N, with N decimal
// or 0x-hex from 0 to 255; components left out are 0.
func ParseSNPTCB(s string) (SNPTCB, error) {
	var t SNPTCB
	for part := range strings.SplitSeq(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return SNPTCB{}, fmt.Errorf("%q is not component=N", part)
		}
		n, err := strconv.ParseUint(v, 0, 8)
		if err != nil {
			return SNPTCB{}, fmt.Errorf("%s: %q is not a number from 0 to 255", k, v)
		}
		switch k {
		case "fmc":
			t.FMC = uint8(n)
		case "bl":
			t.BootLoader = uint8(n)
		case "tee":
			t.TEE = uint8(n)
		case "snp":
			t.SNP = uint8(n)
		case "ucode":
			t.Microcode = uint8(n)
		default:
			return SNPTCB{}, fmt.Errorf("unknown component %q (want fmc, bl, tee, snp, ucode)", k)
		}
	}
	return t, nil
}

// SNPGuestPolicy are the guest policy bits of an SNP report that policies reason about.
type SNPGuestPolicy struct {
	ABIMajor     uint8 `json:"abiMajor"`
	ABIMinor     uint8 `json:"abiMinor"`
	SMT          bool  `json:"smt"`
	MigrateMA    bool  `json:"migrateMA"`
	Debug        bool  `json:"debug"`
	SingleSocket bool  `json:"singleSocket"`
}

// SNPClaims are the claims of a verified SEV-SNP report.
type SNPClaims struct {
	// Product is the product line, such as "Milan" or "Genoa".
	Product string `json:"product"`
	// Signer is "vcek" or "vlek".
	Signer      string         `json:"signer"`
	Version     uint32         `json:"version"`
	VMPL        uint32         `json:"vmpl"`
	GuestSVN    uint32         `json:"guestSvn"`
	Policy      SNPGuestPolicy `json:"policy"`
	Measurement HexBytes       `json:"measurement"`
	HostData    HexBytes       `json:"hostData"`
	FamilyID    HexBytes       `json:"familyId"`
	ImageID     HexBytes       `json:"imageId"`
	ChipID      HexBytes       `json:"chipId"`
	// CurrentTCB is the platform's running TCB; ReportedTCB the one the VCEK was derived
	// from; CommittedTCB the anti-rollback floor; LaunchTCB the TCB at guest launch.
	CurrentTCB   SNPTCB `json:"currentTcb"`
	ReportedTCB  SNPTCB `json:"reportedTcb"`
	CommittedTCB SNPTCB `json:"committedTcb"`
	LaunchTCB    SNPTCB `json:"launchTcb"`
	// TCBStatus is "UpToDate" or "OutOfDate" where collateral says, else "unknown".
	TCBStatus string `json:"tcbStatus"`

	// raw is the verified report, kept for validation through go-sev-guest.
	raw []byte
}

// TDXClaims are the claims of a verified TDX quote.
type TDXClaims struct {
	// QuoteVersion is the quote's version, 4 or 5.
	QuoteVersion  uint16      `json:"quoteVersion"`
	TEETCBSVN     HexBytes    `json:"teeTcbSvn"`
	MRSEAM        HexBytes    `json:"mrSeam"`
	MRSignerSEAM  HexBytes    `json:"mrSignerSeam"`
	SEAMAttribute HexBytes    `json:"seamAttributes"`
	TDAttributes  HexBytes    `json:"tdAttributes"`
	Debug         bool        `json:"debug"`
	XFAM          HexBytes    `json:"xfam"`
	MRTD          HexBytes    `json:"mrTd"`
	MRConfigID    HexBytes    `json:"mrConfigId"`
	MROwner       HexBytes    `json:"mrOwner"`
	MROwnerConfig HexBytes    `json:"mrOwnerConfig"`
	RTMRs         [4]HexBytes `json:"rtmrs"`
	QESVN         uint16      `json:"qeSvn"`
	PCESVN        uint16      `json:"pceSvn"`
	FMSPC         HexBytes    `json:"fmspc"`
	// TEETCBSVN2 and MRServiceTD are those of a TD report 1.5 (quote v5 of a TDX 1.5 module);
	// empty otherwise.
	TEETCBSVN2  HexBytes `json:"teeTcbSvn2,omitempty"`
	MRServiceTD HexBytes `json:"mrServiceTd,omitempty"`
	// TCBStatus is the status Intel's TCB info and QE identity give the platform's, the TDX
	// module's and the quoting enclave's TCB levels; a verified quote's is "UpToDate", the only
	// status Lethe accepts for all three.
	TCBStatus string `json:"tcbStatus"`

	// raw is the verified quote, kept for validation through go-tdx-guest.
	raw []byte
}
