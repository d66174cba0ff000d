// Command lethe-keybroker runs Lethe's keybroker: it releases guests' keys from Vault only to
// attested agents, destroys them when a residency or migration ends, and signs receipts. It
// offers its API over NATS (service "lethe-keybroker", subjects lethe.v1.keybroker.…, in a
// queue group so that several keybrokers share the load), keeps its Vault token alive and
// retries pending destructions from its journal (--state-dir).
//
// It holds Vault credentials and must never print or log them, nor any key. In production it
// connects to NATS with credentials (a creds file, an nkey seed, or a user and password) and
// refuses to start without them unless --dev is given. It refuses roots of trust of emulated
// platforms unless --allow-emulated is given: emulated evidence is for development and CI.
//
// Settings come from flags, environment variables and a YAML configuration file (--config),
// in that order of precedence; docs/configuration.md lists them. With --metrics-listen it
// serves Prometheus metrics, /healthz and /readyz (ready: NATS connected, Vault unsealed and
// reachable with its Transit and KV mounts, the service started). On SIGTERM it stops taking
// requests and lets every request in progress finish, so that no key release stops half-way;
// pending destructions stay journaled under --state-dir for the next start.
package main

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/trace"
	"github.com/lethe-cc/lethe/internal/version"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/policy"
)

type config struct {
	// deprecated are the warnings of deprecated settings, logged at start.
	deprecated []string
	nats       daemon.NATSClient
	dev        bool

	vaultAddr, vaultTokenFile          string
	vaultCACert                        string
	vaultClientCert, vaultClientKey    string
	roleID, secretIDFile, approleMount string
	transitMount, kvMount              string

	stateDir, adminPubFile    string
	trustRoots                []string
	allowEmulated             bool
	collateral                string
	checkRevocation           bool
	nonceTTL                  time.Duration
	id, logLevel, exportPub   string
	logFormat                 string
	configFile, metricsListen string
	logOrigin                 string
	logWitnesses              []string
	otlpEndpoint              string
	maxConcurrent             int
}

func main() {
	if version.Requested(os.Args[1:]) {
		printVersion(os.Stdout)
		return
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		os.Exit(daemon.StartError(os.Stderr, "lethe-keybroker", err))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lethe-keybroker:", err)
		os.Exit(1)
	}
}

// listFlag is a repeatable flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, string(os.PathListSeparator)) }

func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// newFlagSet declares the keybroker's settings on c.
func newFlagSet(c *config) *daemon.Flags {
	fs := daemon.NewFlags("lethe-keybroker")
	fs.String(&c.configFile, "config", "LETHE_KEYBROKER_CONFIG", "", "YAML configuration file whose keys are these flags' names; flags and environment variables override it")
	fs.String(&c.nats.URL, "nats-url", "LETHE_KEYBROKER_NATS_URL", nats.DefaultURL, "NATS server URL")
	c.nats.DeclareAuth(fs, "LETHE_NATS_", "LETHE_NATS_TLS_")
	fs.Bool(&c.dev, "dev", "LETHE_DEV", false, "development mode: allow NATS without authentication")
	fs.String(&c.vaultAddr, "vault-addr", "LETHE_VAULT_ADDR", "", "Vault address (default $VAULT_ADDR)")
	fs.String(&c.vaultCACert, "vault-ca-cert", "LETHE_VAULT_CACERT", "", "CA certificate (PEM) that verifies Vault's TLS certificate (default $VAULT_CACERT, else the system roots)")
	fs.String(&c.vaultClientCert, "vault-client-cert", "LETHE_VAULT_CLIENT_CERT", "", "client certificate (PEM) for a Vault listener that requires one (default $VAULT_CLIENT_CERT)")
	fs.String(&c.vaultClientKey, "vault-client-key", "LETHE_VAULT_CLIENT_KEY", "", "private key (PEM) of --vault-client-cert (default $VAULT_CLIENT_KEY)")
	fs.String(&c.vaultTokenFile, "vault-token-file", "LETHE_VAULT_TOKEN_FILE", "", "file holding a Vault token, token auth (default $VAULT_TOKEN)")
	fs.String(&c.roleID, "approle-role-id", "LETHE_VAULT_ROLE_ID", "", "AppRole role ID; with --approle-secret-id-file, AppRole auth instead of a token")
	fs.String(&c.secretIDFile, "approle-secret-id-file", "LETHE_VAULT_SECRET_ID_FILE", "", "file holding the AppRole secret ID")
	fs.String(&c.approleMount, "approle-mount", "LETHE_VAULT_APPROLE_MOUNT", "", "AppRole auth mount; empty: approle")
	fs.String(&c.transitMount, "transit-mount", "LETHE_VAULT_TRANSIT_MOUNT", "", "Transit mount; empty: transit")
	fs.String(&c.kvMount, "kv-mount", "LETHE_VAULT_KV_MOUNT", "", "KV v2 mount for tenants, guests and receipts; empty: lethe")
	fs.String(&c.stateDir, "state-dir", "LETHE_STATE_DIR", "", "directory for the destruction journal, required")
	fs.String(&c.adminPubFile, "admin-pub", "LETHE_ADMIN_PUB", "", "the operator's admin Ed25519 public key, PEM (lethectl keygen --name admin): admin calls (tenant registration) must be signed by it; empty: admin calls refused")
	fs.List((*listFlag)(&c.trustRoots), "trust-roots", "LETHE_TRUST_ROOTS", filepath.SplitList, "directory of roots of trust (lethectl attest emulate writes those of emulated platforms); repeatable (a path list)")
	fs.Bool(&c.allowEmulated, "allow-emulated", "LETHE_ALLOW_EMULATED", false, "accept roots of emulated platforms: development and CI only")
	fs.String(&c.collateral, "collateral", "LETHE_COLLATERAL_DIR", "", "offline collateral cache directory")
	fs.Bool(&c.checkRevocation, "check-revocation", "LETHE_CHECK_REVOCATION", true, "check the certificates of evidence against CRLs (real platforms: from --collateral; emulated ones: the emulator's); false only where no CRL can be had, with a warning in the log and /readyz")
	fs.Duration(&c.nonceTTL, "nonce-ttl", "LETHE_NONCE_TTL", 60*time.Second, "how long a nonce stays valid")
	fs.String(&c.id, "id", "LETHE_KEYBROKER_ID", "", "instance id in the service's metadata")
	fs.String(&c.logLevel, "log-level", "LETHE_LOG_LEVEL", "info", "log level: debug, info, warn, error")
	fs.String(&c.logFormat, "log-format", "LETHE_LOG_FORMAT", "json", "log format: text or json")
	fs.String(&c.logOrigin, "log-origin", "LETHE_KEYBROKER_LOG_ORIGIN", keybroker.DefaultLogOrigin, "the residency log's name in its checkpoints (no spaces or '+'), which tenants verify with the receipt-signing key; keybrokers on one Vault must share it")
	fs.List((*listFlag)(&c.logWitnesses), "log-witness", "LETHE_KEYBROKER_LOG_WITNESS", strings.Fields, "verifier key of a witness whose cosignatures of the residency log's checkpoints are kept (lethectl log witness keygen prints it); repeatable (space-separated)")
	fs.String(&c.metricsListen, "metrics-listen", "LETHE_KEYBROKER_METRICS_LISTEN", "", "host:port serving /metrics, /healthz and /readyz, without authentication; empty: none")
	fs.String(&c.otlpEndpoint, "otlp-endpoint", "LETHE_KEYBROKER_OTLP_ENDPOINT", "", "OTLP/HTTP collector (host:port, or an http:// or https:// URL) receiving a span per release and destruction, in the migration's trace (docs/deploying.md); empty: no tracing")
	fs.Int(&c.maxConcurrent, "max-concurrent", "LETHE_KEYBROKER_MAX_CONCURRENT", natsapi.DefaultMaxConcurrent, "most requests handled at once; further ones are answered busy and retried a second later: at least the migrations all brokers run at once (one request each at a time)")
	fs.String(&c.exportPub, "export-pub", "", "", "write the receipt-signing public key (PEM) to this file, creating the key if needed, and exit")
	// Every variable is the keybroker's own, LETHE_KEYBROKER_…; LETHE_NATS_URL is lethectl's.
	fs.Namespace("LETHE_KEYBROKER_", "LETHE_NATS_URL")
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
	if err := daemon.CheckLogFlags(c.logFormat, c.logLevel); err != nil {
		return nil, err
	}
	if _, err := c.nats.TLS.Options(); err != nil {
		return nil, err
	}
	if (c.vaultClientCert == "") != (c.vaultClientKey == "") {
		return nil, errors.New("give both --vault-client-cert and --vault-client-key, or neither")
	}
	if _, err := tlog.ParseCheckpoint(tlog.Checkpoint{Origin: c.logOrigin, Root: make([]byte, sha256.Size)}.Text()); err != nil {
		return nil, fmt.Errorf("--log-origin %q: a name without spaces or '+'", c.logOrigin)
	}
	for _, w := range c.logWitnesses {
		if _, err := tlog.ParseWitnessKey(w); err != nil {
			return nil, fmt.Errorf("--log-witness: %w", err)
		}
	}
	if c.maxConcurrent <= 0 {
		return nil, fmt.Errorf("--max-concurrent %d: want a positive number", c.maxConcurrent)
	}
	if c.exportPub != "" {
		return c, nil
	}
	if c.stateDir == "" {
		return nil, errors.New("--state-dir is required: pending key destructions are journaled there")
	}
	if err := c.nats.CheckAuth(c.dev); err != nil {
		return nil, err
	}
	return c, nil
}

// readSecret returns the trimmed contents of path, or "" for an empty path.
func readSecret(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading secret file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// run wires the keybroker's components and runs them until ctx ends.
func run(ctx context.Context, c *config) error {
	log, err := daemon.NewLogger(os.Stderr, c.logFormat, c.logLevel)
	if err != nil {
		return err
	}
	log.Info("Starting", "version", version.String("lethe-keybroker"))
	daemon.LogDeprecations(log, c.deprecated)
	metrics := daemon.NewMetrics()
	kbMetrics := newKeybrokerMetrics(metrics)
	tracer, stopTracing, err := trace.Open(ctx, c.otlpEndpoint, "lethe-keybroker", version.Version, "github.com/lethe-cc/lethe/keybroker")
	if err != nil {
		return fmt.Errorf("--otlp-endpoint: %w", err)
	}
	defer stopTracing()

	vc, approle, err := vaultClient(c)
	if err != nil {
		return err
	}
	verifier, err := newVerifier(c, log)
	if err != nil {
		return err
	}
	var admin ed25519.PublicKey
	if c.adminPubFile != "" {
		if admin, err = policy.ReadPublicKey(c.adminPubFile); err != nil {
			return fmt.Errorf("reading the admin public key: %w", err)
		}
	}
	auditPub := &natsapi.AuditPublisher{Failed: func() { metrics.NATSError("publish") }}
	kb, err := keybroker.New(keybroker.Config{
		Audit: keybroker.AuditSinks{keybroker.SlogAudit{Logger: log.With("component", "keybroker")}, auditPub},
		Vault: vc, AppRole: approle, TransitMount: c.transitMount, KVMount: c.kvMount,
		Verifier: verifier, Logger: log, AdminKey: admin, StateDir: c.stateDir, NonceTTL: c.nonceTTL,
		Metrics: kbMetrics, LogOrigin: c.logOrigin, LogWitnesses: c.logWitnesses, Tracer: tracer,
	})
	if err != nil {
		return err
	}
	kbMetrics.SetBacklog(kb.PendingDestructions)
	if c.exportPub != "" {
		return exportPublicKey(ctx, kb, c.exportPub, log)
	}

	nc, err := c.nats.Connect(ctx, log, "lethe-keybroker", natsauth.InboxPrefix(natsauth.RoleKeybroker, ""), metrics.NATSOptions(log)...)
	if err != nil {
		return err
	}
	defer nc.Close()
	auditPub.SetConn(nc)
	svc, err := natsapi.New(natsapi.Config{Conn: nc, Keybroker: kb, Logger: log, ID: c.id, MaxConcurrent: c.maxConcurrent})
	if err != nil {
		return err
	}
	log.Info("Keybroker running", "vault", vc.Address(), "nats", nc.ConnectedUrlRedacted(), "state_dir", c.stateDir, "log_origin", c.logOrigin, "log_witnesses", len(c.logWitnesses))
	srv := daemon.NewServer(daemon.ServerConfig{
		Listen:   c.metricsListen,
		Registry: metrics.Registry,
		Checks: []daemon.Check{
			daemon.NATSConnected(nc),
			{Name: "vault", Func: func(ctx context.Context) error { return vaultReady(ctx, vc, c.transitMount, c.kvMount) }},
			daemon.Started("service", svc.Started()),
		},
		Warnings: verifierWarnings(c),
		Logger:   log,
	})
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return kb.Run(ctx) })
	g.Go(func() error { return svc.Run(ctx) })
	g.Go(func() error { return srv.Run(ctx) })
	return g.Wait()
}

// vaultReady reports whether Vault answers, initialized and unsealed, with the Transit
// mount transit and the KV version 2 mount kv (empty: the keybroker's defaults) in place:
// the error names a missing or mistyped mount and how to enable it.
func vaultReady(ctx context.Context, vc *api.Client, transit, kv string) error {
	h, err := vc.Sys().HealthWithContext(ctx)
	if err != nil {
		return fmt.Errorf("checking Vault health: %w", err)
	}
	switch {
	case !h.Initialized:
		return errors.New("vault is not initialized")
	case h.Sealed:
		return errors.New("vault is sealed")
	}
	return errors.Join(
		checkMount(ctx, vc, cmp.Or(transit, "transit"), "transit", ""),
		checkMount(ctx, vc, cmp.Or(kv, "lethe"), "kv", "2"),
	)
}

// checkMount returns an error unless Vault has a secrets engine of type typ (and, for kv,
// options version) mounted at path. It asks sys/internal/ui/mounts, which answers any token
// with a capability under the mount, as the keybroker's has.
func checkMount(ctx context.Context, vc *api.Client, path, typ, version string) error {
	enable := fmt.Sprintf("vault secrets enable -path=%s %s", path, typ)
	if version != "" {
		enable = fmt.Sprintf("vault secrets enable -path=%s %s-v%s", path, typ, version)
	}
	s, err := vc.Logical().ReadWithContext(ctx, "sys/internal/ui/mounts/"+path)
	if err != nil || s == nil || s.Data == nil {
		if re, ok := errors.AsType[*api.ResponseError](err); err == nil || ok && re.StatusCode < 500 {
			return fmt.Errorf("vault has no %s mount at %s/ (%s)", typ, path, enable)
		}
		return fmt.Errorf("checking Vault mount %s/: %w", path, err)
	}
	got, _ := s.Data["type"].(string)
	opts, _ := s.Data["options"].(map[string]any)
	gotVersion, _ := opts["version"].(string)
	if got != typ || version != "" && gotVersion != version {
		if got == "kv" {
			got += " v" + cmp.Or(gotVersion, "1")
		}
		want := typ
		if version != "" {
			want += " v" + version
		}
		return fmt.Errorf("vault mount %s/ is %s, want %s (%s)", path, got, want, enable)
	}
	return nil
}

// vaultClient returns the Vault client and, for AppRole auth, the login.
func vaultClient(c *config) (*api.Client, *keybroker.AppRole, error) {
	vcfg := api.DefaultConfig()
	if c.vaultAddr != "" {
		vcfg.Address = c.vaultAddr
	}
	vcfg.MaxRetries = 1
	vcfg.Timeout = 10 * time.Second
	if c.vaultCACert != "" || c.vaultClientCert != "" {
		// Unset fields keep what api.DefaultConfig read from VAULT_CACERT and the like.
		if err := vcfg.ConfigureTLS(&api.TLSConfig{CACert: c.vaultCACert, ClientCert: c.vaultClientCert, ClientKey: c.vaultClientKey}); err != nil {
			return nil, nil, fmt.Errorf("configuring Vault TLS: %w", err)
		}
	}
	vc, err := api.NewClient(vcfg)
	if err != nil {
		return nil, nil, fmt.Errorf("creating Vault client: %w", err)
	}
	tok, err := readSecret(c.vaultTokenFile)
	if err != nil {
		return nil, nil, err
	}
	if tok != "" {
		vc.SetToken(tok)
	}
	if c.roleID == "" {
		return vc, nil, nil
	}
	sid, err := readSecret(c.secretIDFile)
	if err != nil {
		return nil, nil, err
	}
	vc.ClearToken()
	return vc, &keybroker.AppRole{Mount: c.approleMount, RoleID: c.roleID, SecretID: sid}, nil
}

// newVerifier loads the roots of trust, refusing emulated platforms' without --allow-emulated.
func newVerifier(c *config, log *slog.Logger) (*attest.Verifier, error) {
	var roots []attest.Roots
	for _, dir := range c.trustRoots {
		rs, err := attest.LoadRoots(dir)
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			if r.Platform.Emulated() {
				if !c.allowEmulated {
					return nil, fmt.Errorf("trust roots %s hold roots of the emulated platform %s: refusing them without --allow-emulated", dir, r.Platform)
				}
				log.Warn("Accepting evidence of an emulated platform: development only", "platform", r.Platform.String(), "trust_roots", dir)
			}
		}
		roots = append(roots, rs...)
	}
	if !c.checkRevocation {
		log.Warn("Not checking revocation: evidence signed under a revoked VCEK, VLEK or PCK is accepted", "check_revocation", false)
	}
	return attest.NewVerifier(attest.Config{Roots: roots, CollateralDir: c.collateral, CheckRevocations: c.checkRevocation})
}

// verifierWarnings are the /readyz warnings of the verifier's settings.
func verifierWarnings(c *config) []string {
	if c.checkRevocation {
		return nil
	}
	return []string{"revocation: not checked (--check-revocation=false): evidence signed under a revoked VCEK, VLEK or PCK is accepted"}
}

// exportPublicKey writes the receipt-signing public key, PEM, to path.
func exportPublicKey(ctx context.Context, kb *keybroker.Keybroker, path string, log *slog.Logger) error {
	pem, err := kb.PublicKeyPEM(ctx)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, pem, 0o644); err != nil {
		return fmt.Errorf("writing public key: %w", err)
	}
	pub, err := receipt.ParsePublicKeyPEM(pem)
	if err != nil {
		return err
	}
	log.Info("Wrote the receipt-signing public key", "file", path, "key_id", receipt.KeyID(pub))
	fmt.Fprintf(os.Stderr, "receipt-signing key %s written to %s\n", receipt.KeyID(pub), path)
	return nil
}
