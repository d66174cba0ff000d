// Command lethe-broker runs Lethe's migration control plane: the broker API for tenants and
// operators, the migration state machine, and the host registry, all on NATS JetStream.
//
// It never holds a guest key. In production it must connect to NATS with credentials (a creds
// file, an nkey seed, or a user and password) and refuses to start without them; --dev allows a
// connection without authentication and, without --nats-url, runs an embedded NATS server with
// JetStream on loopback for demos.
//
// Settings come from flags, environment variables and a YAML configuration file (--config),
// in that order of precedence; docs/configuration.md lists them. With --metrics-listen it
// serves Prometheus metrics, /healthz and /readyz. On SIGTERM it stops taking requests, lets
// its migration steps end and gives up its leases, so that another broker continues its
// migrations at once.
//
// "lethe-broker nats-config USERS.yaml" writes the nats-server configuration (users, their
// permissions, JetStream, TLS) for the users a YAML file lists; see deploy/nats-users.yaml.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/policy"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"
)

type config struct {
	natsURL, creds, nkeySeed, user, password string
	dev                                      bool
	devListen, devStore                      string
	id, logLevel, logFormat                  string
	configFile, metricsListen                string
	natsTLS                                  daemon.NATSTLS
	lease, checkInterval, hostTTL            time.Duration
	agentTimeout, startTimeout               time.Duration
	progressTimeout, perGiB                  time.Duration
	streams, replicas                        int
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "nats-config" {
		if err := natsConfig(os.Args[2:], os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "lethe-broker nats-config:", err)
			os.Exit(2)
		}
		return
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "lethe-broker:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lethe-broker:", err)
		os.Exit(1)
	}
}

func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func envBool(name string) bool {
	v, _ := strconv.ParseBool(os.Getenv(name))
	return v
}

func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil {
		return d
	}
	return def
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return n
	}
	return def
}

// newFlagSet defines the broker's flags on c, each defaulting to its environment variable.
func newFlagSet(c *config) *flag.FlagSet {
	fs := flag.NewFlagSet("lethe-broker", flag.ContinueOnError)
	fs.StringVar(&c.configFile, "config", env("LETHE_BROKER_CONFIG", ""), "YAML configuration file whose keys are these flags' names; flags and environment variables override it (env LETHE_BROKER_CONFIG)")
	fs.StringVar(&c.natsURL, "nats-url", env("LETHE_NATS_URL", ""), "NATS server URL (env LETHE_NATS_URL); empty with --dev runs an embedded server")
	fs.StringVar(&c.creds, "creds", env("LETHE_NATS_CREDS", ""), "NATS credentials file (env LETHE_NATS_CREDS)")
	fs.StringVar(&c.nkeySeed, "nkey", env("LETHE_NATS_NKEY", ""), "NATS nkey seed file (env LETHE_NATS_NKEY)")
	fs.StringVar(&c.user, "user", env("LETHE_NATS_USER", ""), "NATS user (env LETHE_NATS_USER)")
	fs.StringVar(&c.password, "password", env("LETHE_NATS_PASSWORD", ""), "NATS password (env LETHE_NATS_PASSWORD)")
	fs.StringVar(&c.natsTLS.CA, "nats-tls-ca", env("LETHE_NATS_TLS_CA", ""), "CA certificate (PEM) that verifies the NATS server; empty: the system roots (env LETHE_NATS_TLS_CA)")
	fs.StringVar(&c.natsTLS.Cert, "nats-tls-cert", env("LETHE_NATS_TLS_CERT", ""), "client certificate (PEM) for NATS servers that verify clients (env LETHE_NATS_TLS_CERT)")
	fs.StringVar(&c.natsTLS.Key, "nats-tls-key", env("LETHE_NATS_TLS_KEY", ""), "private key (PEM) of --nats-tls-cert (env LETHE_NATS_TLS_KEY)")
	fs.BoolVar(&c.dev, "dev", envBool("LETHE_DEV"), "development mode: allow NATS without authentication (env LETHE_DEV)")
	fs.StringVar(&c.devListen, "dev-listen", env("LETHE_DEV_LISTEN", "127.0.0.1:4222"), "embedded NATS server address in dev mode (env LETHE_DEV_LISTEN)")
	fs.StringVar(&c.devStore, "dev-store", env("LETHE_DEV_STORE", ""), "embedded JetStream store directory in dev mode; empty: a temporary directory (env LETHE_DEV_STORE)")
	fs.StringVar(&c.id, "id", env("LETHE_BROKER_ID", ""), "broker instance id; empty: random (env LETHE_BROKER_ID)")
	fs.StringVar(&c.logLevel, "log-level", env("LETHE_LOG_LEVEL", "info"), "log level: debug, info, warn, error (env LETHE_LOG_LEVEL)")
	fs.StringVar(&c.logFormat, "log-format", env("LETHE_LOG_FORMAT", "json"), "log format: text or json (env LETHE_LOG_FORMAT)")
	fs.StringVar(&c.metricsListen, "metrics-listen", env("LETHE_BROKER_METRICS_LISTEN", ""), "host:port serving /metrics, /healthz and /readyz, without authentication; empty: none (env LETHE_BROKER_METRICS_LISTEN)")
	fs.DurationVar(&c.lease, "lease", envDuration("LETHE_LEASE", 0), "migration lease; 0: 60s (env LETHE_LEASE)")
	fs.DurationVar(&c.checkInterval, "check-interval", envDuration("LETHE_CHECK_INTERVAL", 0), "timeout and takeover check interval; 0: 1s (env LETHE_CHECK_INTERVAL)")
	fs.DurationVar(&c.hostTTL, "host-ttl", envDuration("LETHE_HOST_TTL", 0), "host heartbeat TTL; 0: 30s (env LETHE_HOST_TTL)")
	fs.DurationVar(&c.agentTimeout, "agent-timeout", envDuration("LETHE_AGENT_TIMEOUT", 0), "timeout of one agent or keybroker call; 0: 30s (env LETHE_AGENT_TIMEOUT)")
	fs.DurationVar(&c.startTimeout, "start-timeout", envDuration("LETHE_START_TIMEOUT", 0), "request to transfer start; 0: 120s (env LETHE_START_TIMEOUT)")
	fs.DurationVar(&c.progressTimeout, "progress-timeout", envDuration("LETHE_PROGRESS_TIMEOUT", 0), "longest time without progress; 0: 150s (env LETHE_PROGRESS_TIMEOUT)")
	fs.DurationVar(&c.perGiB, "timeout-per-gib", envDuration("LETHE_TIMEOUT_PER_GIB", 0), "transfer timeout per GiB of guest memory; 0: 150s (env LETHE_TIMEOUT_PER_GIB)")
	fs.IntVar(&c.streams, "streams", envInt("LETHE_STREAMS", 0), "data-plane streams per transfer; 0: 4 (env LETHE_STREAMS)")
	fs.IntVar(&c.replicas, "replicas", envInt("LETHE_REPLICAS", 0), "JetStream replicas; 0: 1 (env LETHE_REPLICAS)")
	return fs
}

// parseFlags parses the command line, the environment and the configuration file.
func parseFlags(args []string) (*config, error) {
	c := &config{}
	fs := newFlagSet(c)
	if err := daemon.Parse(fs, args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if !c.dev && c.creds == "" && c.nkeySeed == "" && c.user == "" {
		return nil, errors.New("refusing to start without NATS authentication: give --creds, --nkey or --user (or --dev for development)")
	}
	if !c.dev && c.natsURL == "" {
		return nil, errors.New("--nats-url is required (or --dev for an embedded server)")
	}
	if err := daemon.CheckLogFlags(c.logFormat, c.logLevel); err != nil {
		return nil, err
	}
	if _, err := c.natsTLS.Options(); err != nil {
		return nil, err
	}
	return c, nil
}

// run wires the broker's components and runs them until ctx ends.
func run(ctx context.Context, c *config) error {
	log, err := daemon.NewLogger(os.Stderr, c.logFormat, c.logLevel)
	if err != nil {
		return err
	}
	metrics := daemon.NewMetrics()

	g, ctx := errgroup.WithContext(ctx)
	// The embedded server outlives the broker, which hands its leases over as it stops.
	brokerDone := make(chan struct{})
	url := c.natsURL
	if url == "" { // dev mode: embedded server
		ns, err := startDevServer(c, log)
		if err != nil {
			return err
		}
		url = ns.ClientURL()
		g.Go(func() error {
			<-ctx.Done()
			<-brokerDone
			ns.Shutdown()
			ns.WaitForShutdown()
			return nil
		})
	}
	opts := []nats.Option{
		nats.Name("lethe-broker"),
		nats.MaxReconnects(-1),
		nats.CustomInboxPrefix(broker.InboxPrefix(broker.RoleBroker, "")),
	}
	opts = append(opts, metrics.NATSOptions(log)...)
	tlsOpts, err := c.natsTLS.Options()
	if err != nil {
		return err
	}
	opts = append(opts, tlsOpts...)
	switch {
	case c.creds != "":
		opts = append(opts, nats.UserCredentials(c.creds))
	case c.nkeySeed != "":
		o, err := nats.NkeyOptionFromSeed(c.nkeySeed)
		if err != nil {
			return fmt.Errorf("reading nkey seed: %w", err)
		}
		opts = append(opts, o)
	case c.user != "":
		opts = append(opts, nats.UserInfo(c.user, c.password))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return fmt.Errorf("connecting to NATS: %w", err)
	}
	defer nc.Close()

	b, err := broker.New(broker.Config{
		Conn:          nc,
		KeyBroker:     broker.NewKeyBrokerClient(nc, c.agentTimeout),
		Logger:        log,
		ID:            c.id,
		Lease:         c.lease,
		CheckInterval: c.checkInterval,
		HostTTL:       c.hostTTL,
		AgentTimeout:  c.agentTimeout,
		Streams:       c.streams,
		Replicas:      c.replicas,
		Timeouts:      broker.Timeouts{Start: c.startTimeout, Progress: c.progressTimeout, PerGiB: c.perGiB},
		ReadPolicy:    readPrefilter,
		Metrics:       metrics.Broker(),
	})
	if err != nil {
		return err
	}
	srv := daemon.NewServer(daemon.ServerConfig{
		Listen:   c.metricsListen,
		Registry: metrics.Registry,
		Checks:   []daemon.Check{daemon.NATSConnected(nc), daemon.Started("broker", b.Ready())},
		Logger:   log,
	})
	g.Go(func() error {
		defer close(brokerDone)
		return b.Run(ctx)
	})
	g.Go(func() error { return srv.Run(ctx) })
	return g.Wait()
}

// readPrefilter reads the destination pre-filter from a signed policy envelope without checking
// its signature: the result is advice for choosing destinations; the keybroker verifies.
func readPrefilter(envelope []byte) (*broker.Prefilter, error) {
	env, err := policy.ParseEnvelope(envelope)
	if err != nil {
		return nil, err
	}
	p, err := policy.Parse("policy", env.Payload)
	if err != nil {
		return nil, err
	}
	d := p.Spec.Destination
	return &broker.Prefilter{Platforms: d.Platforms, Labels: d.HostLabels, Regions: d.Regions}, nil
}

// startDevServer starts an embedded NATS server with JetStream and no authentication.
func startDevServer(c *config, log *slog.Logger) (*server.Server, error) {
	store := c.devStore
	if store == "" {
		dir, err := os.MkdirTemp("", "lethe-dev-nats-")
		if err != nil {
			return nil, fmt.Errorf("creating dev store: %w", err)
		}
		store = dir
	}
	opts, err := broker.ServerOptions(broker.ServerConfig{Dev: true, Listen: c.devListen, StoreDir: store})
	if err != nil {
		return nil, err
	}
	opts.NoSigs = true
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("creating embedded NATS server: %w", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, errors.New("embedded NATS server not ready within 10s")
	}
	log.Warn("Dev mode: embedded NATS server without authentication", "url", ns.ClientURL(), "store", store)
	return ns, nil
}
