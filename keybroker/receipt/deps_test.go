package receipt_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestOffline checks that receipt verification (lethectl receipt verify) and the agent's side
// of sealing stay apart from Vault and NATS: neither package may depend on them, nor on the
// keybroker's core, which holds the Vault client.
func TestOffline(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("finding the go command: %v", err)
	}
	forbiddenPrefixes := []string{"github.com/hashicorp/vault", "github.com/nats-io/"}
	const core = "github.com/lethe-cc/lethe/keybroker"
	for _, pkg := range []string{core + "/receipt", core + "/seal"} {
		out, err := exec.CommandContext(t.Context(), goCmd, "list", "-deps", pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for _, d := range strings.Fields(string(out)) {
			if d == core {
				t.Errorf("%s depends on the keybroker core", pkg)
			}
			for _, f := range forbiddenPrefixes {
				if strings.HasPrefix(d, f) {
					t.Errorf("%s depends on %s", pkg, d)
				}
			}
		}
	}
}
