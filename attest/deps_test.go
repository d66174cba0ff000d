package attest_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// forbiddenDeps are module paths that attest and policy must never depend on: they are leaves
// that verify and decide, and only the edges of Lethe talk to NATS, Vault and libvirt.
var forbiddenDeps = []string{
	"github.com/nats-io/",
	"github.com/hashicorp/vault",
	"github.com/digitalocean/go-libvirt",
	"libvirt.org/",
}

// goTool returns the go command: go test puts the one running the tests first on PATH.
func goTool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("finding the go command: %v", err)
	}
	return p
}

func depsPathExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// listDeps returns the packages pkg depends on (itself included), test files excluded.
func listDeps(t *testing.T, pkg string) []string {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), goTool(t), "list", "-deps", pkg)
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

func TestDependencies(t *testing.T) {
	tests := []struct {
		name string
		pkg  string
		// dir is the package's directory relative to this one.
		dir       string
		forbidden []string
	}{
		{name: "attest", pkg: "github.com/lethe-cc/lethe/attest", dir: ".", forbidden: append([]string{"github.com/lethe-cc/lethe/attest/emulate"}, forbiddenDeps...)},
		{name: "attest/emulate", pkg: "github.com/lethe-cc/lethe/attest/emulate", dir: "emulate", forbidden: forbiddenDeps},
		{name: "policy", pkg: "github.com/lethe-cc/lethe/policy", dir: "../policy", forbidden: forbiddenDeps},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !depsPathExists(tt.dir) {
				t.Fatalf("%s is missing: the test would check nothing", tt.pkg)
			}
			for _, dep := range listDeps(t, tt.pkg) {
				for _, bad := range tt.forbidden {
					if dep == strings.TrimSuffix(bad, "/") || strings.HasPrefix(dep, bad) {
						t.Errorf("%s depends on %s, which it must never import", tt.pkg, dep)
					}
				}
			}
		})
	}
}
