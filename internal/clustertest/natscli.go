package clustertest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
)

// NATSCLIVersion is the version of the nats CLI (module github.com/nats-io/natscli) that
// NATSCLI builds. It is pinned here rather than required in go.mod: requiring it would bring 31
// modules Lethe has nowhere in its module graph (nsc, jsm.go, a template engine, terminal
// user interfaces) into go.mod and go.sum for the sake of one test.
const NATSCLIVersion = "v0.5.0"

// natsCLIPackage is the main package of the nats CLI.
const natsCLIPackage = "github.com/nats-io/natscli/nats"

// ErrNotFetched is returned, wrapped, by NATSCLI when the go command cannot fetch the CLI's
// modules (no network, or no module proxy): a reason outside the project.
var ErrNotFetched = errors.New("the nats CLI's modules cannot be fetched")

// NATSCLI returns the path of the nats CLI at NATSCLIVersion, building it into the per-user
// cache, ${XDG_CACHE_HOME:-$HOME/.cache}/lethe/nats-VERSION, the first time. The build runs in
// a module of its own in a temporary directory, so the CLI's dependencies are resolved as its
// own go.mod has them and never touch the project's. It returns an error wrapping
// ErrNotFetched when the modules cannot be fetched.
func NATSCLI() (string, error) {
	return cached("nats", NATSCLIVersion, func(path string) error {
		dir, err := os.MkdirTemp("", "lethe-natscli-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		if out, err := isolatedGo(dir, "mod", "init", "lethe.test/natscli"); err != nil {
			return fmt.Errorf("creating the nats CLI's build module: %w\n%s", err, out)
		}
		if out, err := isolatedGo(dir, "get", natsCLIPackage+"@"+NATSCLIVersion); err != nil {
			return fmt.Errorf("%w: fetching %s@%s: %w\n%s", ErrNotFetched, natsCLIPackage, NATSCLIVersion, err, out)
		}
		if out, err := isolatedGo(dir, "build", "-o", path, natsCLIPackage); err != nil {
			return fmt.Errorf("building the nats CLI %s: %w\n%s", NATSCLIVersion, err, out)
		}
		return nil
	})
}

// isolatedGo runs the go command in dir, a module of its own, outside any workspace and with
// the caller's GOFLAGS replaced, so that nothing of the project's module settings applies.
func isolatedGo(dir string, args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	out, err := cmd.CombinedOutput()
	return string(out), err
}
