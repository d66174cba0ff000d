package main

import (
	"testing"

	"github.com/lethe-cc/lethe/internal/deptest"
)

// TestDeps checks that the broker holds no key and drives no hypervisor: it calls the
// keybroker and the agents over NATS. (It links nats-server for the embedded development
// server.)
func TestDeps(t *testing.T) {
	deptest.Check(t, "github.com/lethe-cc/lethe/cmd/lethe-broker", "", deptest.Forbidden{
		"github.com/hashicorp/vault/...":              "Vault client: only the keybroker talks to Vault",
		"github.com/lethe-cc/lethe/keybroker":         "the keybroker's core, which holds the Vault client (the broker speaks kbwire)",
		"github.com/digitalocean/go-libvirt/...":      "libvirt client: only the agent drives libvirt",
		"github.com/lethe-cc/lethe/migagent/libvirt":  "the agent's hypervisor driver",
		"github.com/lethe-cc/lethe/attest/emulate":    "attestation emulator: the broker verifies no evidence",
		"github.com/lethe-cc/lethe/internal/natstest": "test server",
	})
}
