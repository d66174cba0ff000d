// Package version says which build of Lethe a binary is, for each binary's --version, its
// startup log and its lethe_build_info metric: the version a release build is stamped with,
// or else what the go command recorded in the binary (the main module's version and the VCS
// revision it was built from).
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

// Build is what a binary knows of its own build.
type Build struct {
	// Version is the stamped release version, else the main module's version, else "devel".
	Version string
	// Revision is the full VCS revision the binary was built from; empty if the go command
	// recorded none (a build outside a repository, or with -buildvcs=false).
	Revision string
	// Modified reports whether the work tree had uncommitted changes.
	Modified bool
	// GoVersion is the Go release that built the binary.
	GoVersion string
}

// Info returns the running binary's build.
func Info() Build {
	b := Build{Version: Version, GoVersion: runtime.Version()}
	if info, ok := debug.ReadBuildInfo(); ok {
		if b.Version == "" {
			b.Version = info.Main.Version
		}
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				b.Revision = s.Value
			case "vcs.modified":
				b.Modified = s.Value == "true"
			}
		}
	}
	if b.Version == "" || b.Version == "(devel)" {
		b.Version = "devel"
	}
	return b
}

// String returns one line naming binary, its version, the VCS revision it was built from (with
// ", modified" if the work tree had uncommitted changes) and the Go release, for example
// "lethe-agent v1.2.3 (revision 3f2f6b4c1d2e, go1.26.0)".
func String(binary string) string {
	b, details := Info(), []string{}
	if b.Revision != "" {
		d := "revision " + b.Revision[:min(len(b.Revision), 12)]
		if b.Modified {
			d += ", modified"
		}
		details = append(details, d)
	}
	details = append(details, b.GoVersion)
	return fmt.Sprintf("%s %s (%s)", binary, b.Version, strings.Join(details, ", "))
}

// Requested reports whether args, a daemon's command-line arguments without the program
// name, ask for its version and nothing else: --version or -version alone.
func Requested(args []string) bool {
	return len(args) == 1 && slices.Contains([]string{"--version", "-version"}, args[0])
}
