// Package daemon is the plumbing Lethe's three daemons (lethe-broker, lethe-keybroker,
// lethe-agent) share: configuration files layered under flags and environment variables,
// structured logging, the NATS connection, and an HTTP endpoint for Prometheus metrics and
// health checks. Package daemontest holds the checks of every daemon's configuration tests.
//
// # Configuration
//
// Every setting of a daemon is a flag of its standard library flag.FlagSet, an environment
// variable, and a key of its YAML configuration file. [Flags] declares each setting once: its
// flag name, its environment variable, its default, its description and the variable its
// value goes to ([Flags.String], [Flags.Bool], [Flags.Int], [Flags.Uint64], [Flags.Duration],
// [Flags.List]). [Flags.Parse] parses the command line, then sets every flag the command line
// did not set from its environment variable, then every flag that neither set from the file
// named by the flag "config", so the precedence is flag > environment > file > built-in
// default. An environment variable set to the empty string counts as unset; one whose value
// its flag refuses is an error that names it. Each daemon's variables are under its own
// prefix ([Flags.Namespace]: LETHE_BROKER_, LETHE_KEYBROKER_, LETHE_AGENT_); a renamed
// variable stays readable as an alias ([Flags.Alias]) and [Flags.Deprecations] says so once
// at start. A secret ([Flags.Secret]) can instead come from the file its variable's _FILE
// twin names. [Reference] makes the table of a daemon's
// settings that docs/configuration.md holds.
//
// The file is one YAML mapping whose keys are exactly the flag names (without dashes in
// front), read by package internal/strictyaml. Values are scalars; a flag declared with
// [Flags.List] also takes a list. The file is read strictly: an unknown key, a duplicate key,
// a key of a command-line-only flag (one declared with no environment variable, such as an
// action), a value the flag refuses, a null, a nested mapping, or YAML anchors, aliases and
// tags are errors that name the file, line and column ([ConfigError]).
//
// # Logs
//
// [NewLogger] makes the slog logger of a daemon: text or JSON, at a level.
//
// # NATS
//
// [NATSClient] holds a daemon's NATS settings: [NATSClient.CheckAuth] refuses a connection
// without authentication outside development mode, and [NATSClient.Connect] connects with the
// daemon's name, its role's inbox prefix, TLS ([NATSTLS]) and its credentials; a daemon that
// starts before NATS, or while a NATS node is down, waits for it, logging each failed
// attempt with the URLs it tried, and then reconnects forever.
//
// # Metrics and health
//
// [Server] serves /metrics (a registry of the daemon's own, never the global one), /healthz
// (the process is alive) and /readyz (every readiness [Check] passes: NATS connected, Vault
// reachable, the service started). It is off unless a daemon is given a listen address, and
// it is meant for a private network or loopback: it has no authentication. [Metrics] holds a
// daemon's registry, with the Go and process collectors and the NATS error counter every
// daemon has. The Prometheus implementations of the metric hooks of packages broker,
// keybroker and migagent (which themselves import no Prometheus) live beside the daemon that
// uses each (cmd/lethe-broker, cmd/lethe-keybroker, cmd/lethe-agent): this package imports
// none of those packages, so that linking it adds none of them to a binary.
//
// The package must never log or expose a secret: configuration values are not logged, and
// metrics carry counts, durations and low-cardinality labels only (phases, outcomes, error
// codes), never migration ids, tenants or keys.
package daemon
