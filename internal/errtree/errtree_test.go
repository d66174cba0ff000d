package errtree_test

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/errtree"
)

type found struct{ n int }

func (f *found) Error() string { return fmt.Sprint("found ", f.n) }

func TestAll(t *testing.T) {
	a, b, c := &found{1}, &found{2}, &found{3}
	err := fmt.Errorf("outer: %w", errors.Join(a, errors.New("other"), fmt.Errorf("wrapped: %w", errors.Join(b, c))))
	var got []int
	for _, f := range errtree.All[*found](err) {
		got = append(got, f.n)
	}
	if diff := cmp.Diff([]int{1, 2, 3}, got); diff != "" {
		t.Errorf("All (-want +got):\n%s", diff)
	}
	if got := errtree.All[*found](nil); got != nil {
		t.Errorf("All(nil) = %v, want nil", got)
	}
	if got := errtree.All[*found](errors.New("none")); got != nil {
		t.Errorf("All(an error without one) = %v, want nil", got)
	}
}

// TestDependencies keeps errtree a leaf: attest and strictyaml, leaves themselves, use it.
func TestDependencies(t *testing.T) {
	out, err := exec.CommandContext(t.Context(), "go", "list", "-deps", "github.com/lethe-cc/lethe/internal/errtree").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if first, _, _ := strings.Cut(dep, "/"); strings.Contains(first, ".") && dep != "github.com/lethe-cc/lethe/internal/errtree" {
			t.Errorf("errtree depends on %s: it may import only the standard library", dep)
		}
	}
}
