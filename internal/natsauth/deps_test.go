package natsauth_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLeaf checks that natsauth stays a leaf every binary can link: it depends on the
// standard library alone.
func TestLeaf(t *testing.T) {
	const pkg = "github.com/lethe-cc/lethe/internal/natsauth"
	out, err := exec.CommandContext(t.Context(), "go", "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, d := range strings.Fields(string(out)) {
		if first, _, _ := strings.Cut(d, "/"); strings.Contains(first, ".") && d != pkg {
			t.Errorf("%s depends on %s", pkg, d)
		}
	}
}
