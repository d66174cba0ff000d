package main

import (
	"testing"

	"github.com/lethe-cc/lethe/internal/deptest"
)

// TestDeps checks that the keybroker, which holds the Vault token, links no hypervisor and
// no NATS server: it is a NATS client that serves one API.
func TestDeps(t *testing.T) {
	deptest.Check(t, "github.com/lethe-cc/lethe/cmd/lethe-keybroker", "", deptest.Forbidden{
		"github.com/digitalocean/go-libvirt/...":      "libvirt client: only the agent drives libvirt",
		"github.com/lethe-cc/lethe/migagent/libvirt":  "the agent's hypervisor driver",
		"github.com/nats-io/nats-server/...":          "NATS server code",
		"github.com/lethe-cc/lethe/broker":            "the broker's core",
		"github.com/lethe-cc/lethe/internal/natstest": "test server",
	})
}
