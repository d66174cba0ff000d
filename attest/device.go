package attest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/google/go-configfs-tsm/configfs/linuxtsm"
	"github.com/google/go-configfs-tsm/report"
	sevclient "github.com/google/go-sev-guest/client"
	tdxclient "github.com/google/go-tdx-guest/client"
)

// The guest interfaces real attesters look for.
const (
	configfsTSMPath = "/sys/kernel/config/tsm/report"
	sevGuestDevice  = "/dev/sev-guest"
	tdxGuestDevice  = "/dev/tdx_guest"
)

// ErrNoTEE is returned by Detect when the machine offers no SEV-SNP or TDX guest interface.
var ErrNoTEE = errors.New("no confidential computing guest interface found")

// snpQuoteProvider is the part of go-sev-guest's client.QuoteProvider a SEV-SNP attester uses.
type snpQuoteProvider interface {
	GetRawQuote(reportData [64]byte) ([]byte, error)
}

// SNPAttester produces SEV-SNP evidence through go-sev-guest's client: configfs-tsm when the
// kernel offers it, else /dev/sev-guest. Its raw bytes are the report followed by the
// certificate table the host provisioned (configfs-tsm's auxblob, or the extended report's
// certificates), whole: the VCEK, or the VLEK a cloud provider's host provisions (the only
// way a VLEK reaches the verifier but the operator's collateral cache), under their GUIDs.
type SNPAttester struct {
	qp snpQuoteProvider
}

// NewSNPAttester returns an attester for the SEV-SNP guest this process runs in. It returns an
// error wrapping ErrNoTEE when neither configfs-tsm (with the sev_guest provider) nor
// /dev/sev-guest is usable.
func NewSNPAttester() (*SNPAttester, error) {
	qp, err := sevclient.GetQuoteProvider()
	if err != nil {
		return nil, fmt.Errorf("opening SEV-SNP guest (looked for %s with provider sev_guest and %s): %w: %w",
			configfsTSMPath, sevGuestDevice, ErrNoTEE, err)
	}
	return &SNPAttester{qp: qp}, nil
}

// Platform implements Attester.
func (*SNPAttester) Platform() Platform { return PlatformSEVSNP }

// Attest implements Attester. The guest device does not take a context: ctx is checked before
// the request only.
func (a *SNPAttester) Attest(ctx context.Context, reportData [ReportDataSize]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	raw, err := a.qp.GetRawQuote(reportData)
	if err != nil {
		return nil, fmt.Errorf("getting SEV-SNP report: %w", err)
	}
	return raw, nil
}

// tdxQuoteProvider is go-tdx-guest's client.QuoteProvider.
type tdxQuoteProvider = tdxclient.QuoteProvider

// TDXAttester produces TDX quotes (version 4) through go-tdx-guest's client: configfs-tsm when
// the kernel offers it, else /dev/tdx_guest.
type TDXAttester struct {
	qp any // a tdxclient.QuoteProvider or tdxclient.Device, as client.GetRawQuote takes
}

// NewTDXAttester returns an attester for the TDX guest this process runs in. It returns an error
// wrapping ErrNoTEE when neither configfs-tsm nor /dev/tdx_guest is usable.
func NewTDXAttester() (*TDXAttester, error) {
	qp, err := tdxclient.GetQuoteProvider()
	if err == nil {
		var p tdxQuoteProvider = qp
		if p.IsSupported() == nil && tsmProvider() == "tdx_guest" {
			return &TDXAttester{qp: p}, nil
		}
	}
	if _, err := os.Stat(tdxGuestDevice); err != nil {
		return nil, fmt.Errorf("opening TDX guest (looked for %s with provider tdx_guest and %s): %w", configfsTSMPath, tdxGuestDevice, ErrNoTEE)
	}
	d, err := tdxclient.OpenDevice()
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", tdxGuestDevice, err)
	}
	return &TDXAttester{qp: d}, nil
}

// tsmProvider returns the name of the driver behind configfs-tsm ("sev_guest", "tdx_guest"),
// or "" when configfs-tsm is not there.
func tsmProvider() string {
	c, err := linuxtsm.MakeClient()
	if err != nil {
		return ""
	}
	r, err := report.Create(c, &report.Request{})
	if err != nil {
		return ""
	}
	defer r.Destroy()
	b, err := r.ReadOption("provider")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Platform implements Attester.
func (*TDXAttester) Platform() Platform { return PlatformTDX }

// Attest implements Attester. The guest device does not take a context: ctx is checked before
// the request only.
func (a *TDXAttester) Attest(ctx context.Context, reportData [ReportDataSize]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	raw, err := tdxclient.GetRawQuote(a.qp, reportData)
	if err != nil {
		return nil, fmt.Errorf("getting TDX quote: %w", err)
	}
	if v := tdxQuoteVersion(raw); v != 4 && v != tdxQuoteV5Version {
		return nil, fmt.Errorf("getting TDX quote: the platform returned a quote of version %d, not 4 or 5", v)
	}
	return raw, nil
}

// Detect returns an attester for the confidential computing hardware this process runs on:
// SEV-SNP, then TDX. It returns an error wrapping ErrNoTEE, naming what it looked for, when there
// is neither. Emulated platforms are never detected: they live in package attest/emulate.
func Detect() (Attester, error) {
	snp, snpErr := NewSNPAttester()
	if snpErr == nil {
		return snp, nil
	}
	tdx, tdxErr := NewTDXAttester()
	if tdxErr == nil {
		return tdx, nil
	}
	return nil, fmt.Errorf("detecting TEE hardware (looked for SEV-SNP through %s and %s, TDX through %s and %s): %w",
		configfsTSMPath, sevGuestDevice, configfsTSMPath, tdxGuestDevice, ErrNoTEE)
}
