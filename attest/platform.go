package attest

import (
	"fmt"
)

// Platform is a kind of trusted execution environment that can produce evidence.
type Platform int

// The platforms Lethe knows. The zero value is not a platform.
const (
	PlatformUnknown Platform = iota
	// PlatformSEVSNP is AMD SEV-SNP hardware.
	PlatformSEVSNP
	// PlatformTDX is Intel TDX hardware.
	PlatformTDX
	// PlatformEmulatedSEVSNP is a software SEV-SNP signer with test roots of trust.
	PlatformEmulatedSEVSNP
	// PlatformEmulatedTDX is a software TDX quote signer with test roots of trust.
	PlatformEmulatedTDX
)

var platformNames = [...]string{
	PlatformUnknown:        "unknown",
	PlatformSEVSNP:         "sev-snp",
	PlatformTDX:            "tdx",
	PlatformEmulatedSEVSNP: "emulated-sev-snp",
	PlatformEmulatedTDX:    "emulated-tdx",
}

// Platforms lists every known platform, real ones first.
var Platforms = []Platform{PlatformSEVSNP, PlatformTDX, PlatformEmulatedSEVSNP, PlatformEmulatedTDX}

// String returns the platform's name as it appears in evidence and policies.
func (p Platform) String() string {
	if p < 0 || int(p) >= len(platformNames) {
		return fmt.Sprintf("platform(%d)", int(p))
	}
	return platformNames[p]
}

// ParsePlatform returns the platform with the given name.
func ParsePlatform(name string) (Platform, error) {
	for _, p := range Platforms {
		if p.String() == name {
			return p, nil
		}
	}
	return PlatformUnknown, fmt.Errorf("unknown platform %q (want one of sev-snp, tdx, emulated-sev-snp, emulated-tdx)", name)
}

// MarshalText implements encoding.TextMarshaler.
func (p Platform) MarshalText() ([]byte, error) {
	if p == PlatformUnknown || int(p) >= len(platformNames) {
		return nil, fmt.Errorf("marshaling platform: %v is not a platform", p)
	}
	return []byte(p.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (p *Platform) UnmarshalText(b []byte) error {
	v, err := ParsePlatform(string(b))
	if err != nil {
		return err
	}
	*p = v
	return nil
}

// Emulated reports whether the platform is a software emulation.
func (p Platform) Emulated() bool {
	return p == PlatformEmulatedSEVSNP || p == PlatformEmulatedTDX
}

// IsSNP reports whether the platform produces SEV-SNP reports (real or emulated).
func (p Platform) IsSNP() bool { return p == PlatformSEVSNP || p == PlatformEmulatedSEVSNP }

// IsTDX reports whether the platform produces TDX quotes (real or emulated).
func (p Platform) IsTDX() bool { return p == PlatformTDX || p == PlatformEmulatedTDX }
