package attest

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
)

// AMD KDS facts that go-sev-guest v0.15.0 gets wrong for Turin, kept here so that Turin
// evidence verifies with the library as it is: the Turin TCB_VERSION layout, the fmcSPL
// extension of Turin VCEK and VLEK certificates, and Turin's KDS URLs. Milan and Genoa keep
// the library's own handling.

// snpTurin is the product line whose TCB layout, certificate extensions and KDS URLs differ.
const snpTurin = "Turin"

// snpTCBOf returns the components of the 64-bit TCB_VERSION v as product line line lays them
// out, byte by byte from the least significant:
//
//	Milan, Genoa: bl, tee, reserved ×4, snp, ucode
//	Turin:        fmc, bl, tee, snp, reserved ×3, ucode
func snpTCBOf(line string, v uint64) SNPTCB {
	b := func(i int) uint8 { return uint8(v >> (8 * i)) }
	if line == snpTurin {
		return SNPTCB{FMC: b(0), BootLoader: b(1), TEE: b(2), SNP: b(3), Microcode: b(7)}
	}
	return SNPTCB{BootLoader: b(0), TEE: b(1), SNP: b(6), Microcode: b(7)}
}

// snpTCBVersion is the inverse of snpTCBOf: t as a TCB_VERSION of line, reserved bytes 0. FMC
// is dropped for the lines before Turin, which have no place for it.
func snpTCBVersion(line string, t SNPTCB) uint64 {
	if line == snpTurin {
		return uint64(t.FMC) | uint64(t.BootLoader)<<8 | uint64(t.TEE)<<16 | uint64(t.SNP)<<24 | uint64(t.Microcode)<<56
	}
	return uint64(t.BootLoader) | uint64(t.TEE)<<8 | uint64(t.SNP)<<48 | uint64(t.Microcode)<<56
}

// tcbLE reports whether every component of a is at most b's.
func tcbLE(a, b SNPTCB) bool {
	return a.FMC <= b.FMC && a.BootLoader <= b.BootLoader && a.TEE <= b.TEE && a.SNP <= b.SNP && a.Microcode <= b.Microcode
}

// snpKDSHost is AMD's Key Distribution Service.
const snpKDSHost = "https://kdsintf.amd.com"

// snpVCEKURL returns the AMD KDS URL of the VCEK of chip chipID (a report's CHIP_ID) at
// TCB_VERSION tcb on line: the collateral cache keeps the certificate under it. Turin's names
// the chip by the first 8 bytes of CHIP_ID (the rest are zero) and adds fmcSPL, in AMD's
// order; the others are go-sev-guest's.
func snpVCEKURL(line string, chipID []byte, tcb uint64) string {
	if line != snpTurin {
		return kds.VCEKCertURL(line, chipID, kds.TCBVersion(tcb))
	}
	return snpKDSHost + "/vcek/v1/" + line + "/" + hex.EncodeToString(chipID[:min(len(chipID), snpTurinHWIDSize)]) + "?" + snpTurinSPLQuery(tcb)
}

// snpVLEKURL returns the AMD KDS URL of the VLEK certificate of line at TCB_VERSION tcb. AMD
// serves VLEK certificates only to the cloud provider that loaded the VLEK, so Lethe never
// fetches this URL: it is the name under which an operator places the certificate in the
// collateral cache. A VLEK belongs to a provider and a TCB, not to a chip (its certificate has
// no HWID and VLEK-signed reports usually mask CHIP_ID), so the name holds no chip. Turin's
// takes fmcSPL as Turin's VCEK URL does.
func snpVLEKURL(line string, tcb uint64) string {
	if line != snpTurin {
		return kds.VLEKCertURL(line, kds.TCBVersion(tcb))
	}
	return snpKDSHost + "/vlek/v1/" + line + "/cert?" + snpTurinSPLQuery(tcb)
}

func snpTurinSPLQuery(tcb uint64) string {
	t := snpTCBOf(snpTurin, tcb)
	return fmt.Sprintf("ucodeSPL=%d&snpSPL=%d&teeSPL=%d&blSPL=%d&fmcSPL=%d", t.Microcode, t.SNP, t.TEE, t.BootLoader, t.FMC)
}

// snpTurinHWIDSize is the size of a Turin VCEK's HWID: the significant bytes of CHIP_ID.
const snpTurinHWIDSize = 8

// The AMD KDS certificate extensions, under 1.3.6.1.4.1.3704.1: 1 struct version, 2 product
// name, 3.n security patch levels (SPLs), 4 HWID (VCEK), 5 CSP ID (VLEK).
var (
	oidKDS            = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 3704, 1}
	oidAuthorityKeyID = asn1.ObjectIdentifier{2, 5, 29, 35}
)

// The n of the SPL extensions 1.3.6.1.4.1.3704.1.3.n. 4 to 7 are reserved.
const (
	splBootLoader = 1
	splTEE        = 2
	splSNP        = 3
	splMicrocode  = 8
	splFMC        = 9 // Turin on
	splMax        = 9
)

// snpCertExtensions are the AMD KDS extensions of a VCEK or VLEK certificate.
type snpCertExtensions struct {
	StructVersion uint8
	ProductName   string
	HWID          []byte // VCEK: the chip's ID (64 bytes; 8 from Turin on)
	CSPID         string // VLEK: the cloud provider's name
	SPL           map[int]uint8
}

// parseSNPCertExtensions reads the AMD KDS extensions of endorsement key certificate cert of
// kind key, refusing (as go-sev-guest does) any extension that is neither AMD's nor the
// authority key ID, and knowing fmcSPL (3.9), which go-sev-guest v0.15.0 refuses.
func parseSNPCertExtensions(cert *x509.Certificate, key abi.ReportSigner) (*snpCertExtensions, error) {
	e := &snpCertExtensions{SPL: map[int]uint8{}}
	seen := map[string]bool{}
	var haveVersion, haveName bool
	for _, ext := range cert.Extensions {
		if ext.Id.Equal(oidAuthorityKeyID) {
			continue
		}
		id := ext.Id.String()
		if seen[id] {
			return nil, fmt.Errorf("duplicate AMD KDS extension %s", id)
		}
		seen[id] = true
		if len(ext.Id) <= len(oidKDS) || !ext.Id[:len(oidKDS)].Equal(oidKDS) {
			return nil, fmt.Errorf("not an AMD KDS extension: %s", id)
		}
		arcs := ext.Id[len(oidKDS):]
		var err error
		switch {
		case len(arcs) == 1 && arcs[0] == 1:
			e.StructVersion, err = asn1Uint8(ext.Value)
			haveVersion = true
		case len(arcs) == 1 && arcs[0] == 2:
			e.ProductName, err = asn1IA5(ext.Value)
			haveName = true
		case len(arcs) == 2 && arcs[0] == 3 && arcs[1] >= 1 && arcs[1] <= splMax:
			e.SPL[arcs[1]], err = asn1Uint8(ext.Value)
		case len(arcs) == 1 && arcs[0] == 4:
			e.HWID, err = kdsHWID(ext.Value)
		case len(arcs) == 1 && arcs[0] == 5:
			e.CSPID, err = asn1IA5(ext.Value)
		default:
			return nil, fmt.Errorf("not an AMD KDS extension: %s", id)
		}
		if err != nil {
			return nil, fmt.Errorf("reading extension %s: %w", id, err)
		}
	}
	if !haveVersion || !haveName {
		return nil, errors.New("no struct version or product name extension")
	}
	for _, n := range []int{splBootLoader, splTEE, splSNP, splMicrocode} {
		if _, ok := e.SPL[n]; !ok {
			return nil, fmt.Errorf("no SPL extension 1.3.6.1.4.1.3704.1.3.%d", n)
		}
	}
	switch key {
	case abi.VcekReportSigner:
		if e.CSPID != "" {
			return nil, fmt.Errorf("a VCEK certificate with a CSP ID (%s), as only a VLEK has", e.CSPID)
		}
		if e.HWID == nil {
			return nil, errors.New("a VCEK certificate without HWID")
		}
	case abi.VlekReportSigner:
		if e.CSPID == "" {
			return nil, errors.New("a VLEK certificate without CSP ID")
		}
		if e.HWID != nil {
			return nil, errors.New("a VLEK certificate with a HWID, as only a VCEK has")
		}
	default:
		return nil, fmt.Errorf("unexpected endorsement key kind %v", key)
	}
	return e, nil
}

// tcbVersion returns the TCB_VERSION the certificate's SPLs make on line. Every SPL extension
// is taken into account: Turin's reserved SPLs (3.4 to 3.7) must be 0 and its fmcSPL present;
// a line before Turin must have no fmcSPL, and its reserved SPLs fill its reserved bytes, as
// go-sev-guest composes them.
func (e *snpCertExtensions) tcbVersion(line string) (uint64, error) {
	fmc, hasFMC := e.SPL[splFMC]
	t := SNPTCB{FMC: fmc, BootLoader: e.SPL[splBootLoader], TEE: e.SPL[splTEE], SNP: e.SPL[splSNP], Microcode: e.SPL[splMicrocode]}
	if line == snpTurin {
		if !hasFMC {
			return 0, errors.New("a Turin certificate without fmcSPL (1.3.6.1.4.1.3704.1.3.9)")
		}
		for n := 4; n <= 7; n++ {
			if e.SPL[n] != 0 {
				return 0, fmt.Errorf("reserved SPL 1.3.6.1.4.1.3704.1.3.%d is %d; Turin's TCB has no place for it", n, e.SPL[n])
			}
		}
		return snpTCBVersion(line, t), nil
	}
	if hasFMC {
		return 0, fmt.Errorf("a %s certificate with fmcSPL, which only Turin has", line)
	}
	v := snpTCBVersion(line, t)
	for n := 4; n <= 7; n++ {
		v |= uint64(e.SPL[n]) << (8 * (n - 2))
	}
	return v, nil
}

func asn1Uint8(b []byte) (uint8, error) {
	var i int
	rest, err := asn1.Unmarshal(b, &i)
	if err != nil {
		return 0, err
	}
	if len(rest) != 0 || i < 0 || i > 255 {
		return 0, errors.New("not an integer from 0 to 255")
	}
	return uint8(i), nil
}

func asn1IA5(b []byte) (string, error) {
	if len(b) == 0 || b[0] != asn1.TagIA5String {
		return "", errors.New("not an IA5String")
	}
	var s string
	rest, err := asn1.UnmarshalWithParams(b, &s, "ia5")
	if err != nil {
		return "", err
	}
	if len(rest) != 0 {
		return "", errors.New("bytes after the IA5String")
	}
	return s, nil
}

// kdsHWID reads a HWID extension: AMD stores the bare bytes (64, or 8 from Turin on); an
// OCTET STRING of those sizes is accepted too.
func kdsHWID(b []byte) ([]byte, error) {
	if len(b) == abi.ChipIDSize || len(b) == snpTurinHWIDSize {
		return b, nil
	}
	var octets []byte
	rest, err := asn1.Unmarshal(b, &octets)
	if err != nil || len(rest) != 0 || (len(octets) != abi.ChipIDSize && len(octets) != snpTurinHWIDSize) {
		return nil, fmt.Errorf("HWID of %d bytes, want %d or %d", len(b), abi.ChipIDSize, snpTurinHWIDSize)
	}
	return octets, nil
}
