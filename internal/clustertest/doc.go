// Package clustertest starts real clusters for tests: three nats-server processes routed
// together on loopback with JetStream (NATS), and three Vault servers with integrated Raft
// storage (VaultHA), and lets a test kill, restart and partition their nodes and ask which
// node leads.
//
// The nats-server binary is built once per machine from the module the project requires
// (github.com/nats-io/nats-server/v2 in go.mod) into a per-user cache outside the repository,
// ${XDG_CACHE_HOME:-$HOME/.cache}/lethe/nats-server-VERSION; Vault is $LETHE_VAULT or bin/vault
// (`make vault`), as keybroker/vaulttest finds it. A test that needs a cluster fails, never
// skips, when it cannot start one.
//
// NATSCLI builds the nats CLI, at the version NATSCLIVersion pins, into the same cache
// (nats-VERSION), for tests that run the commands the guides give; its modules stay out of
// the project's go.mod.
//
// The clusters listen on loopback only and keep their data in the test's temporary
// directory. This package is for tests only and must never be linked into a production
// binary.
package clustertest
