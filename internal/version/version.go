// Package version says which build of Lethe a binary is, for each binary's --version: the
// version a release build is stamped with, or else what the go command recorded in the binary
// (the main module's version and the VCS revision it was built from).
//
// Stamp a release with
//
//	go build -ldflags "-X github.com/lethe-cc/lethe/internal/version.Version=v1.2.3" ./cmd/...
//
// It reads only the binary's own build information and reveals nothing a copy of the binary
// does not.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
)

// Version is the release version the binary was stamped with (-ldflags -X); empty means the
// main module's version as the go command recorded it.
var Version = ""

// String returns one line naming binary, its version, the VCS revision it was built from (with
// ", modified" if the work tree had uncommitted changes) and the Go release, for example
// "lethe-agent v1.2.3 (revision 3f2f6b4c1d2e, go1.26.0)".
func String(binary string) string {
	v, details := Version, []string{}
	if info, ok := debug.ReadBuildInfo(); ok {
		if v == "" {
			v = info.Main.Version
		}
		settings := map[string]string{}
		for _, s := range info.Settings {
			settings[s.Key] = s.Value
		}
		if rev := settings["vcs.revision"]; rev != "" {
			d := "revision " + rev[:min(len(rev), 12)]
			if settings["vcs.modified"] == "true" {
				d += ", modified"
			}
			details = append(details, d)
		}
	}
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	details = append(details, runtime.Version())
	return fmt.Sprintf("%s %s (%s)", binary, v, strings.Join(details, ", "))
}

// Requested reports whether args, a daemon's command-line arguments without the program
// name, ask for its version and nothing else: --version or -version alone.
func Requested(args []string) bool {
	return len(args) == 1 && slices.Contains([]string{"--version", "-version"}, args[0])
}
