//go:build lethe_noemulation

package main

import (
	"fmt"

	"github.com/lethe-cc/lethe/attest"
)

// emulationBuiltIn says that this agent was built without the attestation emulator (build tag
// lethe_noemulation): package attest/emulate is not linked.
const emulationBuiltIn = false

// openEmulated refuses every emulated platform; checkEmulated already has.
func openEmulated(_ *config, p attest.Platform) (attest.Attester, error) {
	return nil, fmt.Errorf("--attestation %s: this lethe-agent was built without emulated attestation", p)
}
