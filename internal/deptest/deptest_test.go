package deptest

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestMatch(t *testing.T) {
	bad := Forbidden{
		"github.com/lethe-cc/lethe/broker": "the core",
		"github.com/hashicorp/vault/...":   "Vault",
		"cel.dev/cel-go/...":               "CEL",
	}
	for path, want := range map[string]string{
		"github.com/lethe-cc/lethe/broker":           "github.com/lethe-cc/lethe/broker",
		"github.com/lethe-cc/lethe/broker/brokerapi": "",
		"github.com/hashicorp/vault":                 "github.com/hashicorp/vault/...",
		"github.com/hashicorp/vault/api":             "github.com/hashicorp/vault/...",
		"github.com/hashicorp/vaultish":              "",
		"cel.dev/cel-go/cel":                         "cel.dev/cel-go/...",
		"fmt":                                        "",
	} {
		if got := bad.match(path); got != want {
			t.Errorf("match(%q) = %q, want %q", path, got, want)
		}
	}
}

func TestChain(t *testing.T) {
	deps := map[string][]string{
		"cmd":   {"a", "b"},
		"a":     {"c"},
		"b":     {"vault"},
		"c":     {"b"},
		"vault": nil,
	}
	if diff := cmp.Diff([]string{"cmd", "b", "vault"}, chain(deps, "cmd", "vault")); diff != "" {
		t.Errorf("chain (-want +got):\n%s", diff)
	}
}

func TestDeps(t *testing.T) {
	deps := Deps(t, "github.com/lethe-cc/lethe/internal/deptest", "")
	if _, ok := deps["os/exec"]; !ok {
		t.Errorf("deps of deptest lack os/exec: %v", deps)
	}
	if _, ok := deps["github.com/google/go-cmp/cmp"]; ok {
		t.Error("deps of deptest hold go-cmp, which only its test imports")
	}
}
