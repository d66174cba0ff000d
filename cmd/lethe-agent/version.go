package main

import (
	"fmt"
	"io"

	"github.com/lethe-cc/lethe/internal/version"
)

// printVersion writes what lethe-agent --version prints: the build, and whether the attestation emulator is built in.
func printVersion(w io.Writer) {
	fmt.Fprintln(w, version.String("lethe-agent"))
	fmt.Fprintln(w, emulationLine())
}
