package main

import (
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
}

func TestDeps(t *testing.T) {
	deptest.Check(t, "github.com/lethe-cc/lethe/cmd/lethe-agent", "", agentForbidden)
}
