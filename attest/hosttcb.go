package attest

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-sev-guest/kds"
)

// HostTCB is the TCB level a host's platform reports, read from its evidence without
// verifying it: what an agent advertises so that the broker can prefer destinations whose
// firmware is at least the source's. It is advice for placement. The keybroker decides on
// verified claims (policy rules minimumTcb and destinationTcbAtLeastSource), so a host that
// advertises a TCB it does not have gains only a refusal at release.
type HostTCB struct {
	// SNP is an SEV-SNP platform's reported TCB.
	SNP *SNPTCB `json:"snp,omitempty"`
	// TDX is a TDX platform's TEE_TCB_SVN, 16 bytes.
	TDX HexBytes `json:"tdx,omitempty"`
}

// String formats t as ParseHostTCB reads it: the SNP form of SNPTCB.String, or the TDX
// TEE_TCB_SVN in hex.
func (t HostTCB) String() string {
	switch {
	case t.SNP != nil:
		return t.SNP.String()
	case len(t.TDX) > 0:
		return hex.EncodeToString(t.TDX)
	}
	return ""
}

// ParseHostTCB reads an SEV-SNP TCB ([fmc=N,]bl=N,tee=N,snp=N,ucode=N) or a TDX TEE_TCB_SVN
// (32 hex digits).
func ParseHostTCB(s string) (HostTCB, error) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "=") {
		t, err := ParseSNPTCB(s)
		if err != nil {
			return HostTCB{}, fmt.Errorf("SEV-SNP TCB: %w", err)
		}
		return HostTCB{SNP: &t}, nil
	}
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != tdxTEETCBSVNSize {
		return HostTCB{}, fmt.Errorf("%q is neither an SEV-SNP TCB (bl=N,tee=N,snp=N,ucode=N) nor a TDX TEE_TCB_SVN (%d hex digits)", s, 2*tdxTEETCBSVNSize)
	}
	return HostTCB{TDX: b}, nil
}

// tdxTEETCBSVNSize is the size of a TD quote's TEE_TCB_SVN.
const tdxTEETCBSVNSize = 16

// AtLeast reports whether every component of t is at least o's. ok is false when the two
// cannot be compared (different platforms, or either unknown).
func (t HostTCB) AtLeast(o HostTCB) (atLeast, ok bool) {
	switch {
	case t.SNP != nil && o.SNP != nil:
		a, b := t.SNP, o.SNP
		return a.FMC >= b.FMC && a.BootLoader >= b.BootLoader && a.TEE >= b.TEE && a.SNP >= b.SNP && a.Microcode >= b.Microcode, true
	case len(t.TDX) == tdxTEETCBSVNSize && len(o.TDX) == tdxTEETCBSVNSize:
		for i := range t.TDX {
			if t.TDX[i] < o.TDX[i] {
				return false, true
			}
		}
		return true, true
	}
	return false, false
}

// Equal reports whether t and o are the same level.
func (t HostTCB) Equal(o HostTCB) bool {
	if (t.SNP == nil) != (o.SNP == nil) || (t.SNP != nil && *t.SNP != *o.SNP) {
		return false
	}
	return bytes.Equal(t.TDX, o.TDX)
}

// PeekTCB reads the TCB level ev reports, without verifying anything: for SEV-SNP the
// report's REPORTED_TCB (laid out by the product line the report names; a version 2 report,
// which names none, is read as Milan's and Genoa's), for TDX the quote's TEE_TCB_SVN.
func PeekTCB(ev *Evidence) (HostTCB, error) {
	switch {
	case ev.Platform.IsSNP():
		e, err := parseSNPEvidence(ev.Raw)
		if err != nil {
			return HostTCB{}, err
		}
		line := ""
		if fms := e.report.GetCpuid1EaxFms(); fms != 0 {
			line = kds.ProductLineFromFms(fms)
		}
		t := snpTCBOf(line, e.report.GetReportedTcb())
		return HostTCB{SNP: &t}, nil
	case ev.Platform.IsTDX():
		q, err := parseTDXEvidence(ev.Raw)
		if err != nil {
			return HostTCB{}, err
		}
		return HostTCB{TDX: bytes.Clone(q.facts().teeTCBSVN)}, nil
	}
	return HostTCB{}, errors.New("reading the TCB: unknown platform")
}
