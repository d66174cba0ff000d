// Package deptest checks what a binary links: each cmd/<binary>/deps_test.go lists the
// packages its binary must never link, and Check fails the test if it does, naming the
// chain of imports that brought the package in. It is for tests only and runs the go command
// (go list -deps), so it sees exactly what a build with the same tags would link.
package deptest

import (
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// Forbidden maps a package pattern to why the binary must not link it. A pattern is an import
// path, which matches that package only, or an import path followed by "/...", which matches
// the package and every package below it (as for the go command).
type Forbidden map[string]string

// match returns the pattern of f that path matches, or "".
func (f Forbidden) match(path string) string {
	for p := range f {
		if root, ok := strings.CutSuffix(p, "/..."); ok {
			if path == root || strings.HasPrefix(path, root+"/") {
				return p
			}
		} else if path == p {
			return p
		}
	}
	return ""
}

// Deps returns the packages pkg links when built with tags (a comma-separated build tag list,
// or empty), with each package's direct imports.
func Deps(t *testing.T, pkg, tags string) map[string][]string {
	t.Helper()
	args := []string{"list", "-deps", "-json=ImportPath,Imports"}
	if tags != "" {
		args = append(args, "-tags", tags)
	}
	cmd := exec.CommandContext(t.Context(), "go", append(args, pkg)...)
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := errors.AsType[*exec.ExitError](err); ok {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	deps := map[string][]string{}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("decoding go list output: %v", err)
		}
		deps[p.ImportPath] = p.Imports
	}
	if _, ok := deps[pkg]; !ok {
		t.Fatalf("go list -deps %s: the package itself is missing from the output", pkg)
	}
	return deps
}

// Check fails t for every package pkg links, built with tags, that bad forbids, and says
// through which imports pkg reaches it.
func Check(t *testing.T, pkg, tags string, bad Forbidden) {
	t.Helper()
	deps := Deps(t, pkg, tags)
	paths := make([]string, 0, len(deps))
	for d := range deps {
		paths = append(paths, d)
	}
	slices.Sort(paths)
	for _, d := range paths {
		if p := bad.match(d); p != "" {
			t.Errorf("%s links %s (%s): %s", pkg, d, bad[p], strings.Join(chain(deps, pkg, d), " → "))
		}
	}
}

// chain returns a shortest import chain from pkg to dep.
func chain(deps map[string][]string, pkg, dep string) []string {
	prev := map[string]string{pkg: ""}
	queue := []string{pkg}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if p == dep {
			var c []string
			for ; p != ""; p = prev[p] {
				c = append(c, p)
			}
			slices.Reverse(c)
			return c
		}
		for _, i := range deps[p] {
			if _, seen := prev[i]; !seen {
				prev[i] = p
				queue = append(queue, i)
			}
		}
	}
	return []string{pkg, "…", dep}
}
