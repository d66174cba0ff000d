package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/internal/deptest"
)

// agentForbidden is what the agent, which runs inside the host's TEE, must never link: every
// package it links is attack surface there, and none of these has a use in it.
var agentForbidden = deptest.Forbidden{
	"github.com/hashicorp/vault/...":              "Vault client: only the keybroker talks to Vault",
	"github.com/nats-io/nats-server/...":          "NATS server code",
	"cel.dev/cel-go/...":                          "CEL: the agent evaluates no policy",
	"github.com/google/cel-go/...":                "CEL: the agent evaluates no policy",
	"github.com/lethe-cc/lethe/policy":            "policy engine: the keybroker decides",
	"github.com/lethe-cc/lethe/broker":            "the broker's core (its wire types are in agentapi)",
	"github.com/lethe-cc/lethe/keybroker":         "the keybroker's core (grant, receipt and kbwire are leaves)",
	"github.com/lethe-cc/lethe/internal/natstest": "test server",
	"go.opentelemetry.io/...":                     "tracing exporters: timing data leaving the TEE; the broker records the agent's rounds from its reports",
}

func TestDeps(t *testing.T) {
	deptest.Check(t, "github.com/lethe-cc/lethe/cmd/lethe-agent", "", agentForbidden)
}

// TestNoEmulationBuild checks the production build of the agent (build tag lethe_noemulation):
// it does not link the attestation emulator, it builds, its --version says so, and it refuses
// the emulated platforms with a clear error.
func TestNoEmulationBuild(t *testing.T) {
	const tags = "lethe_noemulation"
	bad := deptest.Forbidden{"github.com/lethe-cc/lethe/attest/emulate/...": "attestation emulator: test roots of trust"}
	for p, why := range agentForbidden {
		bad[p] = why
	}
	deptest.Check(t, "github.com/lethe-cc/lethe/cmd/lethe-agent", tags, bad)

	bin := filepath.Join(t.TempDir(), "lethe-agent")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-tags", tags, "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build -tags %s: %v\n%s", tags, err, out)
	}
	out, err := exec.CommandContext(t.Context(), bin, "--version").Output()
	if err != nil {
		t.Fatalf("lethe-agent --version: %v", err)
	}
	if !strings.HasPrefix(string(out), "lethe-agent ") || !strings.Contains(string(out), "\nemulation: not built\n") {
		t.Errorf("lethe-agent --version printed %q, want the version and \"emulation: not built\"", out)
	}
	cmd := exec.CommandContext(t.Context(), bin, "--host", "h1", "--dev", "--attestation", "emulated-sev-snp", "--allow-emulated", "--emulator-dir", t.TempDir())
	cmd.Env = []string{} // no LETHE_AGENT_ variables from the test's environment
	out, err = cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "built without emulated attestation") {
		t.Errorf("lethe-agent with emulated attestation: err %v, output %q; want a refusal naming the build", err, out)
	}
}
