package kbwire_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLeaf checks that the wire contract stays a leaf the broker can link: it may depend on
// neither Vault nor NATS, nor on the keybroker's core, which holds the Vault client.
func TestLeaf(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("finding the go command: %v", err)
	}
	const pkg = "github.com/lethe-cc/lethe/keybroker/kbwire"
	out, err := exec.CommandContext(t.Context(), goCmd, "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, d := range strings.Fields(string(out)) {
		if d == "github.com/lethe-cc/lethe/keybroker" {
			t.Errorf("%s depends on the keybroker core", pkg)
		}
		for _, f := range []string{"github.com/hashicorp/vault", "github.com/nats-io/"} {
			if strings.HasPrefix(d, f) {
				t.Errorf("%s depends on %s", pkg, d)
			}
		}
	}
}
