package emulate

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/lethe-cc/lethe/attest"
)

// Options set what an emulated platform reports. Fields for the other platform are ignored.
// Zero values give a plausible, non-debug guest.
type Options struct {
	// Debug makes the guest a debug guest (SNP guest policy DEBUG bit; TDX TD attribute DEBUG).
	Debug bool

	// SNP.
	Product     string         // product line, "Milan" (default) or "Genoa"
	Measurement []byte         // 48 bytes; zero if empty
	TCB         *attest.SNPTCB // reported, committed, current and launch TCB, and the VCEK's; nil: a fixed default
	// ChipID is the chip: 64 bytes, random per platform if empty. SNP: the report's CHIP_ID
	// and the VCEK's. TDX: the PPID of the PCK certificate derives from it, so that hosts
	// sharing an emulator directory are distinct platforms, each with a PCK certificate of
	// its own; empty: one PPID for the whole emulator.
	ChipID    []byte
	HostData  []byte // 32 bytes
	VMPL      uint32
	MigrateMA bool

	// TDX.
	MRTD      []byte    // 48 bytes (also set by Measurement when MRTD is empty)
	RTMRs     [4][]byte // 48 bytes each
	TEETCBSVN []byte    // 16 bytes; nil: a fixed default
	FMSPC     []byte    // 6 bytes; nil: a fixed default
	MRSEAM    []byte    // 48 bytes
}

// Platform is an emulated platform: an attester together with the roots of trust that make
// its evidence verify.
type Platform interface {
	attest.Attester
	// Roots returns the public roots (and collateral) a Verifier needs for this platform.
	Roots() attest.Roots
	// Save writes the platform's keys and roots under dir/<platform>/, so that Open can sign
	// as the same platform later. The private keys are written with mode 0600.
	Save(dir string) error
	// Revoke revokes the platform's current endorsement key certificate, the SEV-SNP VCEK of
	// its chip ID and TCB or the TDX PCK of its platform (chip ID) and FMSPC: the emulator's
	// CRLs list it from now on, in Roots and, after Save, under the saved directory, where a
	// Verifier given LoadRoots' roots reads them on every verification. Evidence signed under
	// that certificate is then rejected as revoked (attest.ReasonRevoked) by a Verifier that
	// checks revocations, as a real platform's is when AMD or Intel revoke its key.
	Revoke() error
}

// New returns a new emulated platform with fresh keys.
func New(p attest.Platform, opts Options) (Platform, error) {
	switch p {
	case attest.PlatformEmulatedSEVSNP:
		return newSNP(opts)
	case attest.PlatformEmulatedTDX:
		return newTDX(opts)
	}
	return nil, fmt.Errorf("%v is not an emulated platform", p)
}

// Open returns the emulated platform saved under dir, with opts applied to what it reports,
// or, if dir holds none for p, a new one saved there.
func Open(dir string, p attest.Platform, opts Options) (Platform, error) {
	if _, err := os.Stat(filepath.Join(dir, p.String(), attest.RootsFile)); errors.Is(err, fs.ErrNotExist) {
		e, err := New(p, opts)
		if err != nil {
			return nil, err
		}
		if err := e.Save(dir); err != nil {
			return nil, err
		}
		return e, nil
	}
	switch p {
	case attest.PlatformEmulatedSEVSNP:
		return loadSNP(dir, opts)
	case attest.PlatformEmulatedTDX:
		return loadTDX(dir, opts)
	}
	return nil, fmt.Errorf("%v is not an emulated platform", p)
}
