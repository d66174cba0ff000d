package keybroker_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestCoreWithoutNATS checks that the keybroker's core stays usable without NATS: only its
// edge, package natsapi, may depend on it.
func TestCoreWithoutNATS(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("finding the go command: %v", err)
	}
	const core = "github.com/lethe-cc/lethe/keybroker"
	out, err := exec.CommandContext(t.Context(), goCmd, "list", "-deps", core).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", core, err)
	}
	for _, d := range strings.Fields(string(out)) {
		if strings.HasPrefix(d, "github.com/nats-io/") || d == core+"/natsapi" {
			t.Errorf("%s depends on %s", core, d)
		}
	}
}
