// Command lethe-agent runs Lethe's migration agent on one host: it serves the agent API to the
// broker over NATS, keeps the host's record fresh with the guests it holds, attests with the
// host's SEV-SNP or TDX hardware, and moves guest memory encrypted end to end. With
// --libvirt-socket its guests are the host's libvirt domains (tenant and VM from the domain's
// Lethe metadata element, or --libvirt-tenant), whose live migrations it carries through the
// same encrypted transport.
//
// It must never print or log a key, a sealed key blob or raw evidence. Attestation is real
// hardware by default (--attestation auto); the emulated platforms, software signers with test
// roots of trust, are used only with --attestation emulated-sev-snp|emulated-tdx together with
// --allow-emulated, and a production keybroker refuses their evidence anyway. Built with the
// tag lethe_noemulation (make agent-production), the agent does not link the emulator at all
// and refuses the emulated platforms; --version says which build it is. In production it
// must connect to NATS with credentials (a creds file, an nkey seed, or a user and password);
// --dev allows a connection without authentication.
//
// Settings come from flags, each with an environment variable (LETHE_AGENT_HOST, …) as
// default.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/version"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/migagent"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

type config struct {
	// deprecated are the warnings of deprecated settings, logged at start.
	deprecated                                  []string
	host                                        string
	nats                                        daemon.NATSClient
	dev                                         bool
	dataListen, dataAdvertise                   string
	attestation                                 string
	allowEmulated                               bool
	emulatorDir, emulatedTCB, emulatedTEETCBSVN string
	emulatedChipID, emulatedMeasurement         string
	emulatedDebug                               bool
	labels                                      map[string]string
	region                                      string
	guests                                      []migagent.GuestSpec
	workloadRate, streams                       int
	allocatable                                 string
	allocatableBytes                            uint64
	maxMigrations                               int
	workloadAutoConverge                        bool
	heartbeat                                   time.Duration
	logFormat, logLevel                         string
	labelSpec, configFile, metricsListen        string
	keybrokerPub                                string
	libvirt                                     migagent.LibvirtConfig
}

func main() {
	if version.Requested(os.Args[1:]) {
		printVersion(os.Stdout)
		return
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		os.Exit(daemon.StartError(os.Stderr, "lethe-agent", err))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lethe-agent:", err)
		os.Exit(1)
	}
}

// guestFlags collects repeated --guest flags.
type guestFlags struct{ specs *[]migagent.GuestSpec }

func (g guestFlags) String() string {
	if g.specs == nil {
		return ""
	}
	var s []string
	for _, spec := range *g.specs {
		s = append(s, spec.String())
	}
	return strings.Join(s, " ")
}

func (g guestFlags) Set(v string) error {
	spec, err := migagent.ParseGuestSpec(v)
	if err != nil {
		return err
	}
	*g.specs = append(*g.specs, spec)
	return nil
}

// newFlagSet declares the agent's settings on c.
func newFlagSet(c *config) *daemon.Flags {
	hostname, _ := os.Hostname()
	hostname, _, _ = strings.Cut(hostname, ".")
	fs := daemon.NewFlags("lethe-agent")
	fs.String(&c.configFile, "config", "LETHE_AGENT_CONFIG", "", "YAML configuration file whose keys are these flags' names; flags and environment variables override it")
	fs.String(&c.host, "host", "LETHE_AGENT_HOST", hostname, "this host's name: letters, digits, '-', '_' (default the short host name)")
	fs.String(&c.nats.URL, "nats-url", "LETHE_AGENT_NATS_URL", nats.DefaultURL, "NATS server URL")
	c.nats.DeclareAuth(fs, "LETHE_AGENT_NATS_", "LETHE_AGENT_NATS_TLS_")
	for _, name := range []string{"creds", "nkey", "user", "password"} {
		fs.Alias(name, "LETHE_AGENT_"+strings.ToUpper(name))
	}
	fs.Bool(&c.dev, "dev", "LETHE_AGENT_DEV", false, "development mode: allow NATS without authentication")
	fs.String(&c.dataListen, "data-listen", "LETHE_AGENT_DATA_LISTEN", "127.0.0.1:0", "host:port of the data plane's listener for incoming migrations; port 0: one ephemeral port per migration")
	fs.String(&c.dataAdvertise, "data-advertise", "LETHE_AGENT_DATA_ADVERTISE", "", "host or IP sources dial for the data plane; empty: the --data-listen host")
	fs.String(&c.attestation, "attestation", "LETHE_AGENT_ATTESTATION", "auto", "auto (detect SEV-SNP or TDX hardware), sev-snp, tdx, emulated-sev-snp or emulated-tdx")
	fs.Bool(&c.allowEmulated, "allow-emulated", "LETHE_AGENT_ALLOW_EMULATED", false, "allow an emulated platform (development and CI only)")
	fs.String(&c.emulatorDir, "emulator-dir", "LETHE_AGENT_EMULATOR_DIR", "", "directory of the emulated platform's keys and roots, created if empty; the keybroker trusts its roots")
	fs.String(&c.emulatedTCB, "emulated-tcb", "LETHE_AGENT_EMULATED_TCB", "", "emulated SEV-SNP TCB, bl=N,tee=N,snp=N,ucode=N; empty: the emulator's default")
	fs.String(&c.emulatedMeasurement, "emulated-measurement", "LETHE_AGENT_EMULATED_MEASUREMENT", "", "emulated launch measurement (TDX MRTD), 48 bytes hex; empty: zero")
	fs.Bool(&c.emulatedDebug, "emulated-debug", "LETHE_AGENT_EMULATED_DEBUG", false, "emulate a debug guest (SNP policy DEBUG, TDX attribute DEBUG): for testing that policies refuse it")
	fs.String(&c.emulatedTEETCBSVN, "emulated-tee-tcb-svn", "LETHE_AGENT_EMULATED_TEE_TCB_SVN", "", "emulated TDX TEE TCB SVN, 16 bytes hex; empty: the emulator's default")
	fs.String(&c.emulatedChipID, "emulated-chip-id", "LETHE_AGENT_EMULATED_CHIP_ID", "", "emulated SEV-SNP chip ID, 64 bytes hex; empty: derived from --host, so hosts sharing an emulator directory are distinct chips")
	fs.String(&c.keybrokerPub, "keybroker-pub", "LETHE_AGENT_KEYBROKER_PUB", "", "the keybroker's public key, PEM (lethe-keybroker --export-pub writes it); required: the agent accepts sealed keys only with a grant signed by this key")
	fs.String(&c.labelSpec, "labels", "LETHE_AGENT_LABELS", "", "host labels, k=v,k=v")
	fs.String(&c.region, "region", "LETHE_AGENT_REGION", "", "the host's region")
	fs.List(guestFlags{&c.guests}, "guest", "LETHE_AGENT_GUESTS", strings.Fields, "a guest held from the start, tenant/vm=SIZE (SIZE like 256MiB) or tenant/vm=file:PATH; repeatable (space-separated)")
	fs.Int(&c.workloadRate, "workload-rate", "LETHE_AGENT_WORKLOAD_RATE", 0, "pages per second each guest's synthetic workload writes; 0: 2000, negative: none")
	fs.String(&c.allocatable, "allocatable-memory", "LETHE_AGENT_ALLOCATABLE_MEMORY", "", "memory the host offers guests, like 48GiB: the broker places no more on it, and the agent refuses a migration beyond it; empty: all of the host's memory")
	fs.Int(&c.maxMigrations, "max-migrations", "LETHE_AGENT_MAX_MIGRATIONS", 256, "migrations the agent holds in flight at once, as source or destination (each holds keys, evidence and, arriving, a listener and receive region); it refuses one beyond it, and states it in its host record so that brokers admit no more")
	fs.Bool(&c.workloadAutoConverge, "workload-auto-converge", "LETHE_AGENT_WORKLOAD_AUTO_CONVERGE", true, "throttle an in-process guest's workload while pre-copy does not converge, in transfers with a downtime limit (libvirt guests: auto-converge)")
	fs.Int(&c.streams, "streams", "LETHE_AGENT_STREAMS", 0, "data-plane connections of a transfer whose request names none; 0: 4")
	fs.Duration(&c.heartbeat, "heartbeat-interval", "LETHE_AGENT_HEARTBEAT_INTERVAL", 0, "time between host record heartbeats; 0: 5s")
	fs.String(&c.libvirt.Socket, "libvirt-socket", "LETHE_AGENT_LIBVIRT_SOCKET", "", "libvirtd's read-write unix socket: the host's libvirt domains become the agent's guests and every incoming migration is a libvirt one; empty: no libvirt")
	fs.String(&c.libvirt.MigrateDir, "libvirt-migrate-dir", "LETHE_AGENT_LIBVIRT_MIGRATE_DIR", "", "directory of the unix sockets between the agent and the hypervisor, reachable only by both; empty: /run/lethe-agent/migrate")
	fs.String(&c.libvirt.Tenant, "libvirt-tenant", "LETHE_AGENT_LIBVIRT_TENANT", "", "tenant of running domains whose metadata names no Lethe guest (they are guests under their domain name); empty: only domains with the metadata are guests")
	fs.Duration(&c.libvirt.Settings.MaxDowntime, "max-downtime", "LETHE_AGENT_MAX_DOWNTIME", 0, "longest pause of a libvirt guest at cutover; 0: the hypervisor's default")
	fs.Uint64(&c.libvirt.Settings.Bandwidth, "bandwidth", "LETHE_AGENT_BANDWIDTH", 0, "cap of a libvirt migration in MiB/s; 0: unlimited")
	fs.Bool(&c.libvirt.Settings.AutoConverge, "auto-converge", "LETHE_AGENT_AUTO_CONVERGE", false, "throttle a libvirt guest's vCPUs while pre-copy does not converge")
	fs.Int(&c.libvirt.Settings.Parallel, "parallel-connections", "LETHE_AGENT_PARALLEL_CONNECTIONS", 0, "multifd channels of the libvirt migrations the agent sends, and the most it accepts, each carried on a data-plane connection of its own beside the main one (0 to 16; a migration uses the fewer of the source's and the destination's); 0: QEMU's single migration stream")
	fs.Bool(&c.libvirt.Settings.PostCopy, "post-copy", "LETHE_AGENT_POST_COPY", false, "allow libvirt migrations to switch to post-copy after 3 pre-copy iterations, those whose tenant's policy allows it too (spec.transport.allowPostCopy, stated in the grant); a failure after the switch loses the guest")
	fs.String(&c.logFormat, "log-format", "LETHE_AGENT_LOG_FORMAT", "text", "log format: text or json")
	fs.String(&c.logLevel, "log-level", "LETHE_AGENT_LOG_LEVEL", "info", "log level: debug, info, warn, error")
	fs.String(&c.metricsListen, "metrics-listen", "LETHE_AGENT_METRICS_LISTEN", "", "host:port serving /metrics, /healthz and /readyz, without authentication; empty: none")
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
	c.deprecated = fs.Deprecations()
	if err := agentapi.ValidName(c.host); err != nil {
		return nil, fmt.Errorf("--host: %w", err)
	}
	var err error
	if c.labels, err = parseLabels(c.labelSpec); err != nil {
		return nil, err
	}
	if c.allocatable != "" {
		n, err := migagent.ParseSize(c.allocatable)
		if err != nil {
			return nil, fmt.Errorf("--allocatable-memory: %w", err)
		}
		c.allocatableBytes = uint64(n)
	}
	if c.maxMigrations < 1 {
		return nil, fmt.Errorf("--max-migrations: %d, want at least 1", c.maxMigrations)
	}
	if err := c.nats.CheckAuth(c.dev); err != nil {
		return nil, err
	}
	if err := daemon.CheckLogFlags(c.logFormat, c.logLevel); err != nil {
		return nil, err
	}
	p, err := attest.ParsePlatform(c.attestation)
	if c.attestation != "auto" && err != nil {
		return nil, fmt.Errorf("--attestation %q: want auto, sev-snp, tdx, emulated-sev-snp or emulated-tdx", c.attestation)
	}
	if c.attestation != "auto" && p.Emulated() {
		if err := checkEmulated(c, p); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// parseLabels parses k=v,k=v.
func parseLabels(s string) (map[string]string, error) {
	if s == "" {
		return nil, nil
	}
	out := map[string]string{}
	for kv := range strings.SplitSeq(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--labels: %q is not k=v", kv)
		}
		out[k] = v
	}
	return out, nil
}

// attester returns the attester --attestation chose.
func attester(c *config) (attest.Attester, error) {
	if c.attestation == "auto" {
		return attest.Detect()
	}
	p, err := attest.ParsePlatform(c.attestation)
	if err != nil {
		return nil, err
	}
	switch p {
	case attest.PlatformSEVSNP:
		return attest.NewSNPAttester()
	case attest.PlatformTDX:
		return attest.NewTDXAttester()
	case attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX:
		if err := checkEmulated(c, p); err != nil {
			return nil, err
		}
		return openEmulated(c, p)
	}
	return nil, fmt.Errorf("--attestation %s is not supported", p)
}

// run wires the agent and runs it until ctx ends.
func run(ctx context.Context, c *config) error {
	log, err := daemon.NewLogger(os.Stderr, c.logFormat, c.logLevel)
	if err != nil {
		return err
	}
	log.Info("Starting", "version", version.String("lethe-agent"))
	daemon.LogDeprecations(log, c.deprecated)
	// An in-process guest's memory is allocated and written at start: one larger than the
	// host's available memory would fill it until the kernel killed the agent.
	if avail, err := migagent.MemAvailable(); err == nil {
		if err := checkGuestSizes(c.guests, avail); err != nil {
			return err
		}
	}
	if c.keybrokerPub == "" {
		return errors.New("--keybroker-pub is required: the agent accepts keys only with grants signed by the keybroker's key")
	}
	pem, err := os.ReadFile(c.keybrokerPub)
	if err != nil {
		return fmt.Errorf("reading --keybroker-pub: %w", err)
	}
	kbKey, err := receipt.ParsePublicKeyPEM(pem)
	if err != nil {
		return fmt.Errorf("parsing --keybroker-pub %s: %w", c.keybrokerPub, err)
	}
	att, err := attester(c)
	if err != nil {
		return fmt.Errorf("choosing attestation: %w", err)
	}
	if att.Platform().Emulated() {
		log.Warn("Emulated attestation: this host's evidence proves nothing; development and CI only", "platform", att.Platform().String(), "emulator_dir", c.emulatorDir)
	}
	metrics := daemon.NewMetrics()
	nc, err := c.nats.Connect(ctx, log, "lethe-agent "+c.host, natsauth.InboxPrefix(natsauth.RoleAgent, c.host), metrics.NATSOptions(log)...)
	if err != nil {
		return err
	}
	defer nc.Close()
	n, err := cancellable(ctx, func() (*migagent.Node, error) {
		return migagent.New(migagent.Config{
			Host: c.host, Conn: nc, Attester: att, KeybrokerKey: kbKey, Labels: c.labels, Region: c.region,
			DataListen: c.dataListen, DataAdvertise: c.dataAdvertise, Streams: c.streams,
			Guests: c.guests, WorkloadRate: c.workloadRate, HeartbeatInterval: c.heartbeat, AllocatableBytes: c.allocatableBytes, MaxMigrations: c.maxMigrations, NoAutoConverge: !c.workloadAutoConverge, Logger: log,
			Libvirt: c.libvirt,
			Metrics: newAgentMetrics(metrics),
		})
	})
	if err != nil && ctx.Err() != nil {
		log.Info("Agent stopped while making its guests")
		return nil
	}
	if err != nil {
		return err
	}
	srv := daemon.NewServer(daemon.ServerConfig{
		Listen:   c.metricsListen,
		Registry: metrics.Registry,
		Checks:   []daemon.Check{daemon.NATSConnected(nc), daemon.Started("agent", n.Started())},
		Logger:   log,
	})
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return n.Run(ctx) })
	g.Go(func() error { return srv.Run(ctx) })
	return g.Wait()
}
