// Package daemontest holds the checks every Lethe daemon's configuration tests make
// (cmd/lethe-broker, cmd/lethe-keybroker, cmd/lethe-agent): a clean environment, the
// configuration reference in docs/configuration.md kept in sync with the flags, and every
// flag a setting. It is for tests only and must never be linked into a daemon.
package daemontest

import (
	"flag"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/internal/daemon"
)

// ConfigurationDoc is the configuration reference, as a daemon's package (cmd/<daemon>) sees
// it.
const ConfigurationDoc = "../../docs/configuration.md"

// ClearEnv unsets every LETHE_ variable for the test, so that defaults are the built-in ones.
// The variables are restored when the test ends.
func ClearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "LETHE_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

// CheckReference checks that the section name of ConfigurationDoc is the reference of fs's
// flags (daemon.Reference, with defaults for the defaults computed from the machine), or
// rewrites the section when update is set.
func CheckReference(t *testing.T, name string, fs *daemon.Flags, defaults map[string]string, update bool) {
	t.Helper()
	ref := daemon.Reference(fs, defaults)
	if err := daemon.SyncSection(ConfigurationDoc, name, ref, update); err != nil {
		t.Error(err)
	}
}

// CheckEveryFlagIsASetting checks that every flag of fs but the commandLineOnly ones names its
// environment variable, and so is a key of the configuration file too.
func CheckEveryFlagIsASetting(t *testing.T, fs *daemon.Flags, commandLineOnly ...string) {
	t.Helper()
	fs.VisitAll(func(f *flag.Flag) {
		if fs.EnvVar(f.Name) == "" && !slices.Contains(commandLineOnly, f.Name) {
			t.Errorf("flag --%s names no environment variable", f.Name)
		}
	})
}
