package main

import (
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/attest"
)

// The emulated platforms (software signers with test roots of trust, package attest/emulate)
// are for development and CI. They are linked into the agent only in the default build: built
// with the tag lethe_noemulation (emulation_off.go), the agent holds no emulator at all and
// refuses the emulated platforms. Either way they are used only with --attestation
// emulated-sev-snp|emulated-tdx together with --allow-emulated, and a production keybroker
// refuses their evidence.

// emulationLine is what --version says about the emulated platforms.
func emulationLine() string {
	if emulationBuiltIn {
		return "emulation: built in"
	}
	return "emulation: not built"
}

// checkEmulated checks that the emulated platform p may be used: that this agent was built with
// the emulator, and that the flags allow it and name its directory.
func checkEmulated(c *config, p attest.Platform) error {
	if !emulationBuiltIn {
		return fmt.Errorf("--attestation %s: this lethe-agent was built without emulated attestation (build tag lethe_noemulation); it attests with SEV-SNP or TDX hardware only", p)
	}
	if !c.allowEmulated {
		return fmt.Errorf("refusing emulated attestation (%s) without --allow-emulated: emulated platforms prove nothing and are for development and CI only", p)
	}
	if c.emulatorDir == "" {
		return errors.New("--emulator-dir is required with emulated attestation: the keybroker must be given the roots saved there")
	}
	return nil
}
