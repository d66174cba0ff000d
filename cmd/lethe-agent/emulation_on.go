//go:build !lethe_noemulation

package main

import (
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// emulationBuiltIn says that this agent holds the attestation emulator.
const emulationBuiltIn = true

// openEmulated opens the emulated platform p in --emulator-dir, reporting what the flags say.
// checkEmulated has allowed p.
func openEmulated(c *config, p attest.Platform) (attest.Attester, error) {
	opts, err := emulatedOptions(c)
	if err != nil {
		return nil, err
	}
	return emulate.Open(c.emulatorDir, p, opts)
}

// emulatedOptions builds what the emulated platform reports from the flags.
func emulatedOptions(c *config) (emulate.Options, error) {
	opts := emulate.Options{Debug: c.emulatedDebug}
	if c.emulatedMeasurement != "" {
		b, err := hex.DecodeString(c.emulatedMeasurement)
		if err != nil || len(b) != 48 {
			return opts, errors.New("--emulated-measurement: want 48 bytes of hex")
		}
		opts.Measurement = b
	}
	if c.emulatedTCB != "" {
		tcb, err := parseTCB(c.emulatedTCB)
		if err != nil {
			return opts, err
		}
		opts.TCB = tcb
	}
	if c.emulatedTEETCBSVN != "" {
		b, err := hex.DecodeString(c.emulatedTEETCBSVN)
		if err != nil || len(b) != 16 {
			return opts, errors.New("--emulated-tee-tcb-svn: want 16 bytes of hex")
		}
		opts.TEETCBSVN = b
	}
	if c.emulatedChipID != "" {
		b, err := hex.DecodeString(c.emulatedChipID)
		if err != nil || len(b) != sha512.Size {
			return opts, errors.New("--emulated-chip-id: want 64 bytes of hex")
		}
		opts.ChipID = b
	} else {
		id := sha512.Sum512([]byte("lethe emulated chip " + c.host))
		opts.ChipID = id[:]
	}
	return opts, nil
}

// parseTCB parses --emulated-tcb (attest.ParseSNPTCB's form).
func parseTCB(s string) (*attest.SNPTCB, error) {
	tcb, err := attest.ParseSNPTCB(s)
	if err != nil {
		return nil, fmt.Errorf("--emulated-tcb: %w", err)
	}
	return &tcb, nil
}
