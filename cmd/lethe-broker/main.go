// Command lethe-broker runs Lethe's migration control plane: the broker API for tenants and
// operators, the migration state machine, and the host registry, all on NATS JetStream.
//
// It never holds a guest key. In production it must connect to NATS with credentials (a creds
// file, an nkey seed, or a user and password) and refuses to start without them; --dev allows a
// connection without authentication and, without --nats-url, runs an embedded NATS server with
// JetStream on loopback for demos.
//
// Settings come from flags, each with an environment variable (LETHE_NATS_URL, …) as default.
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
	"github.com/lethe-cc/lethe/policy"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"
)

type config struct {
	natsURL, creds, nkeySeed, user, password string
	dev                                      bool
	devListen, devStore                      string
	id, logLevel                             string
	lease, checkInterval, hostTTL            time.Duration
	agentTimeout, startTimeout               time.Duration
	progressTimeout, perGiB                  time.Duration
	streams, replicas                        int
}

func main() {
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

func parseFlags(args []string) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("lethe-broker", flag.ContinueOnError)
	fs.StringVar(&c.natsURL, "nats-url", env("LETHE_NATS_URL", ""), "NATS server URL (env LETHE_NATS_URL); empty with --dev runs an embedded server")
	fs.StringVar(&c.creds, "creds", env("LETHE_NATS_CREDS", ""), "NATS credentials file (env LETHE_NATS_CREDS)")
	fs.StringVar(&c.nkeySeed, "nkey", env("LETHE_NATS_NKEY", ""), "NATS nkey seed file (env LETHE_NATS_NKEY)")
	fs.StringVar(&c.user, "user", env("LETHE_NATS_USER", ""), "NATS user (env LETHE_NATS_USER)")
	fs.StringVar(&c.password, "password", env("LETHE_NATS_PASSWORD", ""), "NATS password (env LETHE_NATS_PASSWORD)")
	fs.BoolVar(&c.dev, "dev", envBool("LETHE_DEV"), "development mode: allow NATS without authentication (env LETHE_DEV)")
	fs.StringVar(&c.devListen, "dev-listen", env("LETHE_DEV_LISTEN", "127.0.0.1:4222"), "embedded NATS server address in dev mode (env LETHE_DEV_LISTEN)")
	fs.StringVar(&c.devStore, "dev-store", env("LETHE_DEV_STORE", ""), "embedded JetStream store directory in dev mode; empty: a temporary directory (env LETHE_DEV_STORE)")
	fs.StringVar(&c.id, "id", env("LETHE_BROKER_ID", ""), "broker instance id; empty: random (env LETHE_BROKER_ID)")
	fs.StringVar(&c.logLevel, "log-level", env("LETHE_LOG_LEVEL", "info"), "log level: debug, info, warn, error (env LETHE_LOG_LEVEL)")
	fs.DurationVar(&c.lease, "lease", envDuration("LETHE_LEASE", 0), "migration lease; 0: 60s (env LETHE_LEASE)")
	fs.DurationVar(&c.checkInterval, "check-interval", envDuration("LETHE_CHECK_INTERVAL", 0), "timeout and takeover check interval; 0: 1s (env LETHE_CHECK_INTERVAL)")
	fs.DurationVar(&c.hostTTL, "host-ttl", envDuration("LETHE_HOST_TTL", 0), "host heartbeat TTL; 0: 30s (env LETHE_HOST_TTL)")
	fs.DurationVar(&c.agentTimeout, "agent-timeout", envDuration("LETHE_AGENT_TIMEOUT", 0), "timeout of one agent or keybroker call; 0: 30s (env LETHE_AGENT_TIMEOUT)")
	fs.DurationVar(&c.startTimeout, "start-timeout", envDuration("LETHE_START_TIMEOUT", 0), "request to transfer start; 0: 120s (env LETHE_START_TIMEOUT)")
	fs.DurationVar(&c.progressTimeout, "progress-timeout", envDuration("LETHE_PROGRESS_TIMEOUT", 0), "longest time without progress; 0: 150s (env LETHE_PROGRESS_TIMEOUT)")
	fs.DurationVar(&c.perGiB, "timeout-per-gib", envDuration("LETHE_TIMEOUT_PER_GIB", 0), "transfer timeout per GiB of guest memory; 0: 150s (env LETHE_TIMEOUT_PER_GIB)")
	fs.IntVar(&c.streams, "streams", envInt("LETHE_STREAMS", 0), "data-plane streams per transfer; 0: 4 (env LETHE_STREAMS)")
	fs.IntVar(&c.replicas, "replicas", envInt("LETHE_REPLICAS", 0), "JetStream replicas; 0: 1 (env LETHE_REPLICAS)")
	if err := fs.Parse(args); err != nil {
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
	return c, nil
}

// run wires the broker's components and runs them until ctx ends.
func run(ctx context.Context, c *config) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("parsing log level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	g, ctx := errgroup.WithContext(ctx)
	url := c.natsURL
	if url == "" { // dev mode: embedded server
		ns, err := startDevServer(c, log)
		if err != nil {
			return err
		}
		url = ns.ClientURL()
		g.Go(func() error {
			<-ctx.Done()
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
	})
	if err != nil {
		return err
	}
	g.Go(func() error { return b.Run(ctx) })
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
