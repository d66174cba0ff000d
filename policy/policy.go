package policy

import (
	"crypto/sha256"
	_ "embed"
	"slices"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// APIVersion and Kind are the only apiVersion and kind a policy may have.
const (
	APIVersion = "lethe.dev/v1"
	Kind       = "MigrationPolicy"
)

// CipherSuiteAES256GCM is the data plane's cipher suite: AES-256-GCM under keys derived with
// HKDF-SHA256 from the transfer key. It is the only suite so far.
const CipherSuiteAES256GCM = "aes-256-gcm"

// CipherSuites lists the cipher suites a policy may name.
var CipherSuites = []string{CipherSuiteAES256GCM}

// SNPProducts lists the SEV-SNP product lines a policy may name.
var SNPProducts = []string{"Milan", "Genoa", "Turin"}

// Policy is a parsed, valid migration policy. Create one with Parse or Verify; the zero value
// is not usable.
type Policy struct {
	APIVersion string   `yaml:"apiVersion"`
	Kind       string   `yaml:"kind"`
	Metadata   Metadata `yaml:"metadata"`
	Spec       Spec     `yaml:"spec"`

	raw []byte
	cel *celProgram
}

// Metadata identifies a policy.
type Metadata struct {
	// Tenant owns the policy; lowercase letters, digits and dashes (it names Vault keys).
	Tenant string `yaml:"tenant"`
	// Name names the policy within the tenant's; same alphabet as Tenant.
	Name string `yaml:"name"`
	// PolicySVN is the policy's security version. A keybroker keeps a floor per (tenant,
	// name), which only the tenant raises (by publishing a policy to the keybroker), and never
	// accepts a policy below it (see CheckRollback).
	PolicySVN uint64 `yaml:"policySvn"`
}

// Spec is what a policy requires. Fields not written in the file take their value from
// DefaultsYAML.
type Spec struct {
	// Guests selects the tenant's guests (VM names) the policy covers: each entry is a VM
	// name, a prefix followed by '*' ("web-*" covers web-1 and web-blue), or "*" alone (every
	// guest of the tenant). Empty (the default) covers no guest: a keybroker refuses the
	// policy for every guest. See Covers.
	Guests []string `yaml:"guests"`
	// Source is required of the host the guest leaves (and, in adoption, not used).
	Source EndRequirements `yaml:"source"`
	// Destination is required of the host the guest goes to (and, in adoption, of the host
	// where it is first taken in).
	Destination DestinationRequirements `yaml:"destination"`
	// DestinationTCBAtLeastSource requires every TCB component of the destination to be at
	// least the source's (SEV-SNP: boot loader, TEE, SNP, microcode of the reported TCB; TDX:
	// each of the 16 TEE TCB SVN bytes), and both ends to be of the same architecture.
	DestinationTCBAtLeastSource bool `yaml:"destinationTcbAtLeastSource"`
	// Transport is how pages travel; agents read it, Evaluate does not.
	Transport Transport `yaml:"transport"`
	// Erasure is what the source's erasure must show; see EvaluateErasure.
	Erasure Erasure `yaml:"erasure"`
	// CEL is an optional CEL expression over the variables source, destination and host (see
	// DefaultsYAML for what they hold); the migration is allowed only if it evaluates to true.
	CEL string `yaml:"cel"`
}

// EndRequirements are required of one end's claims.
type EndRequirements struct {
	// Platforms are the accepted platforms. Emulated platforms are accepted only if listed.
	Platforms []attest.Platform `yaml:"platforms"`
	// SNP applies when the end is SEV-SNP (real or emulated).
	SNP SNPRequirements `yaml:"snp"`
	// TDX applies when the end is TDX (real or emulated).
	TDX TDXRequirements `yaml:"tdx"`
}

// SNPRequirements are the baseline on SEV-SNP claims. Empty lists allow anything.
type SNPRequirements struct {
	// MinimumTCB is the minimum reported TCB, per component.
	MinimumTCB attest.SNPTCB `yaml:"minimumTcb"`
	// MinimumLaunchTCB is the minimum TCB at guest launch, per component.
	MinimumLaunchTCB attest.SNPTCB `yaml:"minimumLaunchTcb"`
	// AllowDebug, AllowSMT and AllowMigrateMA allow the guest policy bits of the same names.
	AllowDebug     bool `yaml:"allowDebug"`
	AllowSMT       bool `yaml:"allowSmt"`
	AllowMigrateMA bool `yaml:"allowMigrateMA"`
	// Measurements are the accepted launch measurements (48 bytes each).
	Measurements []attest.HexBytes `yaml:"measurements" hex:"48"`
	// Products are the accepted product lines (SNPProducts).
	Products []string `yaml:"products"`
	// VMPL is the required VMPL (0 to 3); nil allows any.
	VMPL *uint32 `yaml:"vmpl"`
	// ChipIDs are the accepted chip IDs (64 bytes each).
	ChipIDs []attest.HexBytes `yaml:"chipIds" hex:"64"`
	// HostData is the required host data (32 bytes); empty allows any.
	HostData attest.HexBytes `yaml:"hostData" hex:"32"`
}

// TDXRequirements are the baseline on TDX claims. Empty lists allow anything.
type TDXRequirements struct {
	// MinimumTEETCBSVN is the minimum TEE TCB SVN (16 bytes), compared byte by byte.
	MinimumTEETCBSVN attest.HexBytes `yaml:"minimumTeeTcbSvn" hex:"16"`
	// MRSEAMs are the accepted TDX module measurements (48 bytes each).
	MRSEAMs []attest.HexBytes `yaml:"mrSeams" hex:"48"`
	// MRTDs are the accepted TD measurements (48 bytes each).
	MRTDs []attest.HexBytes `yaml:"mrTds" hex:"48"`
	// RTMR0 to RTMR3 are the accepted values of each runtime measurement register.
	RTMR0 []attest.HexBytes `yaml:"rtmr0" hex:"48"`
	RTMR1 []attest.HexBytes `yaml:"rtmr1" hex:"48"`
	RTMR2 []attest.HexBytes `yaml:"rtmr2" hex:"48"`
	RTMR3 []attest.HexBytes `yaml:"rtmr3" hex:"48"`
	// AllowDebug allows a TD with the DEBUG attribute.
	AllowDebug bool `yaml:"allowDebug"`
	// TDAttributes are the required TD attributes (8 bytes); empty allows any.
	TDAttributes attest.HexBytes `yaml:"tdAttributes" hex:"8"`
	// XFAM is the required XFAM (8 bytes); empty allows any.
	XFAM attest.HexBytes `yaml:"xfam" hex:"8"`
	// MinimumQESVN and MinimumPCESVN are the minimum quoting enclave and PCE SVNs.
	MinimumQESVN  uint16 `yaml:"minimumQeSvn"`
	MinimumPCESVN uint16 `yaml:"minimumPceSvn"`
	// FMSPCs are the accepted FMSPCs (6 bytes each).
	FMSPCs []attest.HexBytes `yaml:"fmspcs" hex:"6"`
}

// DestinationRequirements are required of the destination: what any end must meet, and what
// only a destination can.
type DestinationRequirements struct {
	EndRequirements `yaml:",inline"`
	// HostLabels must all be present on the destination host with these values.
	HostLabels map[string]string `yaml:"hostLabels"`
	// Regions are the accepted regions of the destination host; empty allows any.
	Regions []string `yaml:"regions"`
	// Clean is what the destination's clean-memory statement must show.
	Clean CleanRequirements `yaml:"clean"`
}

// CleanRequirements are required of the destination's clean-memory statement.
type CleanRequirements struct {
	// RequireStatement requires a clean-memory statement saying the receive region was zeroed
	// and verified zero.
	RequireStatement bool `yaml:"requireStatement"`
	// LaunchMeasurement, if set, is the launch measurement (48 bytes) the statement must name.
	LaunchMeasurement attest.HexBytes `yaml:"launchMeasurement" hex:"48"`
	// MinimumBytes is the least size of the receive region.
	MinimumBytes uint64 `yaml:"minimumBytes"`
}

// Transport is how pages travel between the agents.
type Transport struct {
	// CipherSuites are the accepted data-plane cipher suites (CipherSuites), in order of
	// preference.
	CipherSuites []string `yaml:"cipherSuites"`
	// AllowZeroPageElision lets the source skip sending zero pages, which reveals which
	// pages are zero.
	AllowZeroPageElision bool `yaml:"allowZeroPageElision"`
	// MaxDowntime is the longest the tenant lets its guest be paused at cutover (0 or 1ms to
	// 10m). It only tightens the operator's limit: the broker, and the source agent from the
	// keybroker's grant, take the smaller of the two. Zero leaves the operator's limit.
	MaxDowntime time.Duration `yaml:"maxDowntime"`
	// AllowPostCopy lets a libvirt migration that does not converge switch to post-copy,
	// where the agent's operator allows it too: the guest then runs at the destination
	// while its remaining pages arrive, and a failure after the switch loses it.
	AllowPostCopy bool `yaml:"allowPostCopy"`
}

// MaxDowntimeLimit is the largest spec.transport.maxDowntime a policy may write.
const MaxDowntimeLimit = 10 * time.Minute

// Covers reports whether the policy's spec.guests selects guest vm (see Spec.Guests).
func (p *Policy) Covers(vm string) bool { return CoversGuest(p.Spec.Guests, vm) }

// CoversGuest reports whether one of the guest patterns (Spec.Guests) selects vm: an exact
// name, or a pattern ending in '*' whose prefix vm starts with. No pattern selects "".
func CoversGuest(patterns []string, vm string) bool {
	if vm == "" {
		return false
	}
	for _, g := range patterns {
		if prefix, ok := strings.CutSuffix(g, "*"); ok {
			if strings.HasPrefix(vm, prefix) {
				return true
			}
		} else if g == vm {
			return true
		}
	}
	return false
}

// Accepts reports whether suite is one of t's cipher suites.
func (t Transport) Accepts(suite string) bool { return slices.Contains(t.CipherSuites, suite) }

// Erasure is what the source's erasure must show.
type Erasure struct {
	// Deadline is the longest time from commit to the erasure receipt (1s to 24h).
	Deadline time.Duration `yaml:"deadline"`
}

// DefaultsYAML is the one place where a policy's defaults are written down: a policy file is
// decoded over it, so a field the file does not set has the value given here. `lethectl
// policy lint --show-defaults` prints it.
//
//go:embed defaults.yaml
var DefaultsYAML []byte

// Defaults returns the spec that DefaultsYAML describes.
func Defaults() Spec {
	spec, err := decodeDefaults()
	if err != nil {
		// DefaultsYAML is embedded and tested; this cannot happen in a built binary.
		panic("policy: decoding DefaultsYAML: " + err.Error())
	}
	return spec
}

// Raw returns the exact bytes the policy was parsed from (the signed payload).
func (p *Policy) Raw() []byte { return slices.Clone(p.raw) }

// Digest returns SHA-256 of the policy's exact bytes (the signed payload): the policy's
// identity in audit events and receipts.
func (p *Policy) Digest() [32]byte { return sha256.Sum256(p.raw) }

// Requirements translates r into the baseline requirements attest checks.
func (r EndRequirements) Requirements() attest.Requirements {
	toBytes := func(hs []attest.HexBytes) [][]byte {
		if len(hs) == 0 {
			return nil
		}
		out := make([][]byte, len(hs))
		for i, h := range hs {
			out[i] = []byte(h)
		}
		return out
	}
	orNil := func(h attest.HexBytes) []byte {
		if len(h) == 0 {
			return nil
		}
		return []byte(h)
	}
	var products []string
	if len(r.SNP.Products) > 0 {
		products = slices.Clone(r.SNP.Products)
	}
	var vmpl *uint32
	if r.SNP.VMPL != nil {
		v := *r.SNP.VMPL
		vmpl = &v
	}
	return attest.Requirements{
		SNP: attest.SNPRequirements{
			MinimumTCB:       r.SNP.MinimumTCB,
			MinimumLaunchTCB: r.SNP.MinimumLaunchTCB,
			AllowDebug:       r.SNP.AllowDebug,
			AllowSMT:         r.SNP.AllowSMT,
			AllowMigrateMA:   r.SNP.AllowMigrateMA,
			Measurements:     toBytes(r.SNP.Measurements),
			Products:         products,
			VMPL:             vmpl,
			ChipIDs:          toBytes(r.SNP.ChipIDs),
			HostData:         orNil(r.SNP.HostData),
		},
		TDX: attest.TDXRequirements{
			MinimumTEETCBSVN: orNil(r.TDX.MinimumTEETCBSVN),
			MRSEAMs:          toBytes(r.TDX.MRSEAMs),
			MRTDs:            toBytes(r.TDX.MRTDs),
			RTMRs:            [4][][]byte{toBytes(r.TDX.RTMR0), toBytes(r.TDX.RTMR1), toBytes(r.TDX.RTMR2), toBytes(r.TDX.RTMR3)},
			AllowDebug:       r.TDX.AllowDebug,
			TDAttributes:     orNil(r.TDX.TDAttributes),
			XFAM:             orNil(r.TDX.XFAM),
			MinimumQESVN:     r.TDX.MinimumQESVN,
			MinimumPCESVN:    r.TDX.MinimumPCESVN,
			FMSPCs:           toBytes(r.TDX.FMSPCs),
		},
	}
}
