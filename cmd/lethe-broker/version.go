package main

import (
	"fmt"
	"io"

	"github.com/lethe-cc/lethe/internal/version"
)

// printVersion writes what lethe-broker --version prints: the build.
func printVersion(w io.Writer) {
	fmt.Fprintln(w, version.String("lethe-broker"))
}
