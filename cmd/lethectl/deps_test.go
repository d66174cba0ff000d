package main

import (
	"testing"

	"github.com/lethe-cc/lethe/internal/deptest"
)

// TestDeps checks that lethectl, a client, links no server code: it reaches the broker and
// the keybroker over NATS only. (It may link policy and CEL: it verifies and evaluates
// policies.)
func TestDeps(t *testing.T) {
	deptest.Check(t, "github.com/lethe-cc/lethe/cmd/lethectl", "", deptest.Forbidden{
		"github.com/hashicorp/vault/...":              "Vault client: only the keybroker talks to Vault",
		"github.com/nats-io/nats-server/...":          "NATS server code",
		"github.com/lethe-cc/lethe/keybroker":         "the keybroker's core, which holds the Vault client (use kbwire and kbclient)",
		"github.com/lethe-cc/lethe/keybroker/natsapi": "the keybroker's NATS service (use kbclient)",
		"github.com/digitalocean/go-libvirt/...":      "libvirt client: only the agent drives libvirt",
	})
}
