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
// serves Prometheus metrics, /healthz and /readyz (ready: NATS connected, the broker running,
// and JetStream with a quorum: the migrations bucket's stream has a leader). On SIGTERM it stops taking requests, lets
// its migration steps end and gives up its leases, so that another broker continues its
// migrations at once.
//
// "lethe-broker nats-config USERS.yaml" writes the nats-server configuration (users, their
// permissions, JetStream, TLS) for the users a YAML file lists; see deploy/nats-users.yaml.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"golang.org/x/sync/errgroup"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/trace"
	"github.com/lethe-cc/lethe/internal/version"
	"github.com/lethe-cc/lethe/policy"
)

type config struct {
	nats daemon.NATSClient
	// store authenticates the JetStream connection (the broker-store user) to nats's URL with
	// nats's TLS; without credentials the broker uses its main connection for JetStream.
	store                                         daemon.NATSClient
	dev                                           bool
	devListen, devStore                           string
	id, logLevel, logFormat                       string
	configFile, metricsListen                     string
	lease, checkInterval, relistInterval, hostTTL time.Duration
	agentTimeout, startTimeout                    time.Duration
	queueTimeout                                  time.Duration
	maxMigrationsPerHost                          int
	maxKeyBrokerCalls                             int
	tenantSharePercent                            int
	progressTimeout, perGiB                       time.Duration
	streams, replicas                             int
	maxDowntime, auditRetention                   time.Duration
	endedGrace, archiveRetention                  time.Duration
	receiptRetention                              time.Duration
	placementOrder                                string
	fleet                                         broker.FleetConfig
	rebalancePercent, maxAttempts                 int
	otlpEndpoint                                  string
	// deprecated are the warnings of deprecated settings, logged at start.
	deprecated []string
}

func main() {
	if version.Requested(os.Args[1:]) {
		printVersion(os.Stdout)
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "nats-config" {
		if err := natsConfig(os.Args[2:], os.Stdout); err != nil {
			os.Exit(daemon.StartError(os.Stderr, "lethe-broker nats-config", err))
		}
		return
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		os.Exit(daemon.StartError(os.Stderr, "lethe-broker", err))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lethe-broker:", err)
		os.Exit(1)
	}
}

// newFlagSet declares the broker's settings on c.
func newFlagSet(c *config) *daemon.Flags {
	fs := daemon.NewFlags("lethe-broker")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage:
  lethe-broker [flags]               run the broker
  lethe-broker nats-config [--out FILE] USERS.yaml
                                     write the NATS server configuration of Lethe's users
  lethe-broker --version

Flags (each also an environment variable and a key of the --config file):
`)
		fs.PrintDefaults()
	}
	fs.String(&c.configFile, "config", "LETHE_BROKER_CONFIG", "", "YAML configuration file whose keys are these flags' names; flags and environment variables override it")
	fs.String(&c.nats.URL, "nats-url", "LETHE_BROKER_NATS_URL", "", "NATS server URL; empty with --dev runs an embedded server (at --dev-listen, which it may not be given with)")
	c.nats.DeclareAuth(fs, "LETHE_NATS_", "LETHE_NATS_TLS_")
	fs.String(&c.store.Creds, "store-creds", "LETHE_BROKER_STORE_CREDS", "", "NATS credentials file of the broker's JetStream user (role broker-store)")
	fs.String(&c.store.NKeySeed, "store-nkey", "LETHE_BROKER_STORE_NKEY", "", "NATS nkey seed file of the broker's JetStream user")
	fs.String(&c.store.User, "store-user", "LETHE_BROKER_STORE_USER", "", "NATS user of the broker's JetStream connection; no --store-* credentials: JetStream shares the main connection")
	fs.Secret(&c.store.Password, "store-password", "LETHE_BROKER_STORE_PASSWORD", "NATS password of --store-user")
	fs.Bool(&c.dev, "dev", "LETHE_DEV", false, "development mode: allow NATS without authentication")
	fs.String(&c.devListen, "dev-listen", "LETHE_DEV_LISTEN", "127.0.0.1:4222", "embedded NATS server address in dev mode")
	fs.String(&c.devStore, "dev-store", "LETHE_DEV_STORE", "", "embedded JetStream store directory in dev mode; empty: a temporary directory")
	fs.String(&c.id, "id", "LETHE_BROKER_ID", "", "broker instance id; empty: random")
	fs.String(&c.logLevel, "log-level", "LETHE_LOG_LEVEL", "info", "log level: debug, info, warn, error")
	fs.String(&c.logFormat, "log-format", "LETHE_LOG_FORMAT", "json", "log format: text or json")
	fs.String(&c.metricsListen, "metrics-listen", "LETHE_BROKER_METRICS_LISTEN", "", "host:port serving /metrics, /healthz and /readyz, without authentication; empty: none")
	fs.Duration(&c.lease, "lease", "LETHE_LEASE", 0, "how long a broker's claim on a migration lasts unrenewed: a killed broker's migrations continue on another broker within it (plus --check-interval; 4× it for one queued for admission); renewed at half of it and every third of it while a step runs; 0: 15s")
	fs.Duration(&c.checkInterval, "check-interval", "LETHE_CHECK_INTERVAL", 0, "timeout and takeover check interval; 0: 1s")
	fs.Duration(&c.relistInterval, "relist-interval", "LETHE_BROKER_RELIST_INTERVAL", 0, "how often the broker lists the live migrations to refill the view its watch keeps between listings (checks read the view); 0: 30s")
	fs.Duration(&c.hostTTL, "host-ttl", "LETHE_HOST_TTL", 0, "host heartbeat TTL; 0: 30s")
	fs.Duration(&c.agentTimeout, "agent-timeout", "LETHE_AGENT_TIMEOUT", 0, "timeout of one agent or keybroker call; 0: 30s")
	fs.Duration(&c.startTimeout, "start-timeout", "LETHE_START_TIMEOUT", 0, "admission to transfer start; 0: 120s")
	fs.Duration(&c.queueTimeout, "queue-timeout", "LETHE_BROKER_QUEUE_TIMEOUT", 0, "request to admission: how long a migration waits for a place on its hosts before it is aborted; 0: 30m")
	fs.Int(&c.maxKeyBrokerCalls, "max-keybroker-calls", "LETHE_BROKER_MAX_KEYBROKER_CALLS", 0, "key releases and destructions this broker asks of the keybrokers at once; more wait their turn in the broker, so that a slow Vault does not make them time out and be asked again; 0: 32")
	fs.Int(&c.maxMigrationsPerHost, "max-migrations-per-host", "LETHE_BROKER_MAX_MIGRATIONS_PER_HOST", 0, "migrations a host takes part in at once, as source or destination, lowered to what its agent states (lethe-agent --max-migrations); more wait in Requested for a place; 0: 64")
	fs.Int(&c.tenantSharePercent, "tenant-share", "LETHE_BROKER_TENANT_SHARE", 0, "percent of a host's places one tenant's migrations may hold, so that no tenant keeps the others' migrations to or from a host waiting; 100: no bound; 0: 50")
	fs.Duration(&c.progressTimeout, "progress-timeout", "LETHE_PROGRESS_TIMEOUT", 0, "longest time without progress; 0: 150s")
	fs.Duration(&c.perGiB, "timeout-per-gib", "LETHE_TIMEOUT_PER_GIB", 0, "transfer timeout per GiB of guest memory; 0: 150s")
	fs.Int(&c.streams, "streams", "LETHE_STREAMS", 0, "data-plane streams per transfer; 0: 4")
	fs.Duration(&c.maxDowntime, "max-downtime", "LETHE_MAX_DOWNTIME", 0, "longest pause of a guest at cutover, which a tenant's policy may lower (spec.transport.maxDowntime); 0: the agents' own limits")
	fs.Int(&c.replicas, "replicas", "LETHE_REPLICAS", 0, "JetStream replicas; 0: 1")
	fs.Duration(&c.auditRetention, "audit-retention", "LETHE_BROKER_AUDIT_RETENTION", 0, "how long stream LETHE_AUDIT keeps audit records (docs/audit.md); 0: 8760h (365 days)")
	fs.Duration(&c.endedGrace, "ended-grace", "LETHE_BROKER_ENDED_GRACE", 0, "how long an ended migration stays in bucket lethe-migrations, which every check reads whole, before it moves to bucket lethe-archive; 0: 1h")
	fs.Duration(&c.archiveRetention, "archive-retention", "LETHE_BROKER_ARCHIVE_RETENTION", 0, "how long bucket lethe-archive keeps an ended migration, from when it moved there; 0: 8760h (365 days), negative: for ever")
	fs.Duration(&c.receiptRetention, "receipt-retention", "LETHE_BROKER_RECEIPT_RETENTION", 0, "how long bucket lethe-receipts keeps a signed receipt; 0: for ever")
	fs.Int(&c.maxAttempts, "max-attempts", "LETHE_BROKER_MAX_ATTEMPTS", 0, "destinations one migration tries when the keybroker or a destination refuses the one placement chose; 0: 3, 1: never fall back")
	fs.String(&c.placementOrder, "placement-order", "LETHE_BROKER_PLACEMENT_ORDER", "tcb,memory", "how hosts that qualify for a guest are ranked, keys in order: tcb (TCB at least the source's first), memory (least committed first), guests (fewest first)")
	fs.Int(&c.fleet.MaxParallel, "fleet-max-parallel", "LETHE_BROKER_FLEET_MAX_PARALLEL", 0, "most migrations a fleet operation (drain, evacuate, rebalance) lets run across the cluster, counting all; 0: 5")
	fs.Int(&c.fleet.PerSource, "fleet-per-source", "LETHE_BROKER_FLEET_PER_SOURCE", 0, "most migrations a fleet operation lets run out of one host; 0: 2")
	fs.Int(&c.fleet.PerDestination, "fleet-per-destination", "LETHE_BROKER_FLEET_PER_DESTINATION", 0, "most migrations a fleet operation lets run into one host; 0: 2")
	fs.Int(&c.rebalancePercent, "rebalance-threshold", "LETHE_BROKER_REBALANCE_THRESHOLD", 0, "percentage of a host's allocatable memory a rebalance brings its committed memory under; 0: 80")
	fs.String(&c.otlpEndpoint, "otlp-endpoint", "LETHE_BROKER_OTLP_ENDPOINT", "", "OTLP/HTTP collector (host:port, or an http:// or https:// URL) receiving a span per phase of each migration this broker moves and its source agent's rounds and pause, in the migration's trace (docs/deploying.md); empty: no tracing")
	// Every variable is the broker's own, LETHE_BROKER_…; LETHE_NATS_URL is lethectl's.
	fs.Namespace("LETHE_BROKER_", "LETHE_NATS_URL")
	return fs
}

// parseFlags parses the command line, the environment and the configuration file.
func parseFlags(args []string) (*config, error) {
	c := &config{}
	fs := newFlagSet(c)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := c.nats.CheckAuth(c.dev); err != nil {
		return nil, err
	}
	if !c.dev && c.nats.URL == "" {
		return nil, errors.New("--nats-url is required (or --dev for an embedded server)")
	}
	if c.nats.URL != "" && (fs.IsSet("dev-listen") || fs.IsSet("dev-store")) {
		return nil, errors.New("--dev-listen and --dev-store configure the embedded NATS server, which --nats-url replaces: give one or the other")
	}
	c.deprecated = fs.Deprecations()
	if err := daemon.CheckLogFlags(c.logFormat, c.logLevel); err != nil {
		return nil, err
	}
	if _, err := c.nats.TLS.Options(); err != nil {
		return nil, err
	}
	c.fleet.PlacementOrder = strings.Split(strings.ReplaceAll(c.placementOrder, " ", ""), ",")
	if err := broker.CheckPlacementOrder(c.fleet.PlacementOrder); err != nil {
		return nil, fmt.Errorf("--placement-order: %w", err)
	}
	if c.fleet.MaxParallel < 0 || c.fleet.PerSource < 0 || c.fleet.PerDestination < 0 {
		return nil, errors.New("--fleet-max-parallel, --fleet-per-source and --fleet-per-destination must not be negative")
	}
	if c.rebalancePercent < 0 || c.rebalancePercent > 100 {
		return nil, errors.New("--rebalance-threshold: want a percentage from 0 to 100")
	}
	c.fleet.RebalanceThreshold = float64(c.rebalancePercent) / 100
	return c, nil
}

// run wires the broker's components and runs them until ctx ends.
func run(ctx context.Context, c *config) error {
	log, err := daemon.NewLogger(os.Stderr, c.logFormat, c.logLevel)
	if err != nil {
		return err
	}
	log.Info("Starting", "version", version.String("lethe-broker"))
	daemon.LogDeprecations(log, c.deprecated)
	metrics := daemon.NewMetrics()
	tracer, stopTracing, err := trace.Open(ctx, c.otlpEndpoint, "lethe-broker", version.Version, "github.com/lethe-cc/lethe/broker")
	if err != nil {
		return fmt.Errorf("--otlp-endpoint: %w", err)
	}
	defer stopTracing()

	g, ctx := errgroup.WithContext(ctx)
	// The embedded server outlives the broker, which hands its leases over as it stops.
	brokerDone := make(chan struct{})
	conn := c.nats
	if conn.URL == "" { // dev mode: embedded server
		ns, err := startDevServer(c, log)
		if err != nil {
			return err
		}
		conn.URL = ns.ClientURL()
		g.Go(func() error {
			<-ctx.Done()
			<-brokerDone
			ns.Shutdown()
			ns.WaitForShutdown()
			return nil
		})
	}
	nc, err := conn.Connect(ctx, log, "lethe-broker", natsauth.InboxPrefix(natsauth.RoleBroker, ""), metrics.NATSOptions(log)...)
	if err != nil {
		return err
	}
	defer nc.Close()
	checks := []daemon.Check{daemon.NATSConnected(nc)}
	storeNC := nc
	if c.store.Creds != "" || c.store.NKeySeed != "" || c.store.User != "" {
		store := c.nats
		store.Creds, store.NKeySeed, store.User, store.Password = c.store.Creds, c.store.NKeySeed, c.store.User, c.store.Password
		if storeNC, err = store.Connect(ctx, log, "lethe-broker-store", natsauth.InboxPrefix(natsauth.RoleBrokerStore, ""), metrics.NATSOptions(log)...); err != nil {
			return fmt.Errorf("opening the store connection: %w", err)
		}
		defer storeNC.Close()
		storeCheck := daemon.NATSConnected(storeNC)
		storeCheck.Name = "nats-store"
		checks = append(checks, storeCheck)
	} else if !c.dev {
		log.Warn("No --store-creds, --store-nkey or --store-user: JetStream shares the serving NATS user, whose JetStream rights only the broker's reply checks protect")
	}

	b, err := broker.New(broker.Config{
		Conn:                 nc,
		StoreConn:            storeNC,
		KeyBroker:            broker.NewKeyBrokerClient(nc, c.agentTimeout),
		Logger:               log,
		ID:                   c.id,
		Lease:                c.lease,
		CheckInterval:        c.checkInterval,
		RelistInterval:       c.relistInterval,
		HostTTL:              c.hostTTL,
		AgentTimeout:         c.agentTimeout,
		Streams:              c.streams,
		MaxDowntime:          c.maxDowntime,
		Replicas:             c.replicas,
		Timeouts:             broker.Timeouts{Start: c.startTimeout, Queue: c.queueTimeout, Progress: c.progressTimeout, PerGiB: c.perGiB},
		MaxMigrationsPerHost: c.maxMigrationsPerHost,
		MaxKeyBrokerCalls:    c.maxKeyBrokerCalls,
		TenantShare:          float64(c.tenantSharePercent) / 100,
		ReadPolicy:           readPrefilter,
		Fleet:                c.fleet,
		MaxAttempts:          c.maxAttempts,
		Metrics:              newBrokerMetrics(metrics),
		Tracer:               tracer,

		AuditRetention:   c.auditRetention,
		EndedGrace:       c.endedGrace,
		ArchiveRetention: c.archiveRetention,
		ReceiptRetention: c.receiptRetention,
	})
	if err != nil {
		return err
	}
	srv := daemon.NewServer(daemon.ServerConfig{
		Listen:   c.metricsListen,
		Registry: metrics.Registry,
		// Ready only while JetStream has a quorum: without one, the broker can neither read
		// nor write a record, and its API answers unavailable.
		Checks: append(checks, daemon.Started("broker", b.Ready()), daemon.Check{Name: "jetstream", Func: b.StoreReady}),
		Logger: log,
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
	pf := &broker.Prefilter{Platforms: d.Platforms, Labels: d.HostLabels, Regions: d.Regions}
	// One minimum per platform: a host is compared with its own platform's.
	var floor attest.HostTCB
	if t := d.SNP.MinimumTCB; t != (attest.SNPTCB{}) {
		floor.SNP = &t
	}
	floor.TDX = d.TDX.MinimumTEETCBSVN
	if floor.SNP != nil || len(floor.TDX) > 0 {
		pf.MinimumTCB = &floor
	}
	return pf, nil
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
	opts, err := serverOptions(natsauth.ServerConfig{Dev: true, Listen: c.devListen, StoreDir: store})
	if err != nil {
		return nil, err
	}
	opts.NoSigs = true
	// The server fails to listen only in its log, which is off: try the address first, so
	// that a busy port is named rather than reported as a server that never got ready.
	ln, err := net.Listen("tcp", c.devListen)
	if err != nil {
		return nil, fmt.Errorf("starting the embedded NATS server: %w", err)
	}
	ln.Close()
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
