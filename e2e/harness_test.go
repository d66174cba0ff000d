package e2e

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/policy"
)

const (
	demoTenant  = "demo"
	otherTenant = "other"
	// waitLimit bounds every wait for an event.
	waitLimit = 60 * time.Second
	// guestSize is the memory of a scenario's guest.
	guestSize = "8MiB"
	// hostTTL is the brokers' host TTL: a killed agent counts as lost after it.
	hostTTL = 4 * time.Second
	// lease is the brokers' migration lease: a killed broker's migrations are taken over
	// after it.
	lease = 4 * time.Second
	// basePolicySVN is the policySvn of every policy the suite applies, except the one that
	// tests a rollback.
	basePolicySVN = 10
)

// binDir holds the daemons TestMain builds once.
var binDir string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "lethe-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: creating the binary directory:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	for _, c := range []string{"lethe-agent", "lethe-broker"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, c), "./cmd/"+c)
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: building %s: %v\n%s", c, err, out)
			return 1
		}
	}
	binDir = dir
	code := m.Run()
	printReport(os.Stdout)
	return code
}

// env is the whole system under test: a real NATS server with authentication, a real Vault
// behind a proxy the suite can cut, the keybroker with its NATS edge (in this process, with a
// recording audit sink), two broker processes, and agents as processes on emulated SEV-SNP and
// TDX platforms. A loopback capture sees every byte of the agents' data plane.
type env struct {
	t      testing.TB
	dir    string
	log    *slog.Logger
	nats   *natstest.Server
	vault  *vaulttest.Server
	vproxy *vaulttest.Proxy
	kb     *keybroker.Keybroker
	kbPub  ed25519.PublicKey
	// kbPubFile is kbPub as PEM, the file every agent pins (--keybroker-pub).
	kbPubFile string
	audit     *auditLog
	emuDir    string
	capture   *capture

	demoKey, otherKey ed25519.PrivateKey
	basePolicy        []byte
	// adminKey signs the operator's admin requests; the keybroker pins its public half.
	adminKey ed25519.PrivateKey

	passwords map[string]string // NATS login → password
	hosts     []string          // the pool of agent host names with NATS users
	nextHost  int
	nextIP    int

	conn   *nats.Conn // as the broker: KV, agent API, keybroker API
	js     jetstream.JetStream
	agents *agentapi.Client
	kbc    *broker.KeyBrokerClient
	demo   *broker.Client
	other  *broker.Client
	// ops calls the broker API as an operator (fleet operations, host states).
	ops *broker.Client
	// demoNC and otherNC are the two tenants' own NATS connections (the residency log's
	// history is read over them, as lethectl does).
	demoNC, otherNC *nats.Conn

	mu      sync.Mutex
	brokers map[string]*proc
}

// hostPool is how many agent host names have NATS users.
const hostPool = 240

func newEnv(t testing.TB) *env {
	t.Helper()
	ctx := t.Context()
	e := &env{
		t: t, dir: t.TempDir(), passwords: map[string]string{}, brokers: map[string]*proc{},
		audit: &auditLog{},
	}
	logf, err := os.Create(filepath.Join(e.dir, "e2e.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { logf.Close() })
	e.log = slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelInfo}))

	e.capture = startCapture(t)

	// NATS with a user per role, tenant and host.
	users := []natsauth.User{
		{Role: natsauth.RoleBroker, Password: e.password("broker")},
		{Role: natsauth.RoleBrokerStore, Password: e.password("broker-store")},
		{Role: natsauth.RoleKeybroker, Password: e.password("keybroker")},
		{Role: natsauth.RoleTenant, Name: demoTenant, Password: e.password("tenant-" + demoTenant)},
		{Role: natsauth.RoleTenant, Name: otherTenant, Password: e.password("tenant-" + otherTenant)},
		{Role: natsauth.RoleOperator, Password: e.password("operator")},
	}
	for i := range hostPool {
		h := fmt.Sprintf("h%03d", i+1)
		e.hosts = append(e.hosts, h)
		users = append(users, natsauth.User{Role: natsauth.RoleAgent, Name: h, Password: e.password("agent-" + h)})
	}
	var cfg strings.Builder
	if err := natsauth.WriteServerConfig(&cfg, natsauth.ServerConfig{Users: users}); err != nil {
		t.Fatal(err)
	}
	e.nats = natstest.Start(t, natstest.Options{Config: cfg.String()})

	// Vault, behind a proxy the keybroker goes through.
	e.vault = vaulttest.Start(t)
	e.vproxy = e.vault.Proxy(t)

	// One emulator directory holds both emulated platforms: every agent signs with them, and
	// the keybroker trusts their roots.
	e.emuDir = filepath.Join(e.dir, "emulator")
	for _, p := range []attest.Platform{attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX} {
		if _, err := emulate.Open(e.emuDir, p, emulate.Options{}); err != nil {
			t.Fatalf("creating the %s emulator: %v", p, err)
		}
	}
	roots, err := attest.LoadRoots(e.emuDir)
	if err != nil {
		t.Fatal(err)
	}
	verifier, err := attest.NewVerifier(attest.Config{Roots: roots, CheckRevocations: true})
	if err != nil {
		t.Fatal(err)
	}
	vc, err := vaulttest.NewClient(e.vproxy.Addr, e.vault.Token)
	if err != nil {
		t.Fatal(err)
	}
	adminPub, adminKey, _ := ed25519.GenerateKey(rand.Reader)
	e.adminKey = adminKey
	e.kb, err = keybroker.New(keybroker.Config{
		Vault: vc, Verifier: verifier, AdminKey: adminPub, StateDir: filepath.Join(e.dir, "keybroker"),
		RetryInterval: 200 * time.Millisecond, Audit: e.audit, Logger: e.log.With("component", "keybroker"),
	})
	if err != nil {
		t.Fatal(err)
	}
	kbConn := e.connect("keybroker", natsauth.InboxPrefix(natsauth.RoleKeybroker, ""))
	svc, err := natsapi.New(natsapi.Config{Conn: kbConn, Keybroker: e.kb, Logger: e.log.With("component", "keybroker-nats")})
	if err != nil {
		t.Fatal(err)
	}
	e.background("keybroker", e.kb.Run)
	e.background("keybroker service", svc.Run)
	select {
	case <-svc.Started():
	case <-time.After(waitLimit):
		t.Fatal("keybroker service not started")
	}

	var demoPub, otherPub ed25519.PublicKey
	demoPub, e.demoKey, _ = ed25519.GenerateKey(rand.Reader)
	otherPub, e.otherKey, _ = ed25519.GenerateKey(rand.Reader)
	for tenant, pub := range map[string]ed25519.PublicKey{demoTenant: demoPub, otherTenant: otherPub} {
		if _, err := e.kb.RegisterTenant(ctx, e.adminRequest(kbwire.RegisterTenantRequest{Tenant: tenant, PolicyKey: pub})); err != nil {
			t.Fatalf("registering tenant %s: %v", tenant, err)
		}
	}
	if e.kbPub, err = e.kb.PublicKey(ctx); err != nil {
		t.Fatal(err)
	}
	pem, err := receipt.MarshalPublicKeyPEM(e.kbPub)
	if err != nil {
		t.Fatal(err)
	}
	e.kbPubFile = filepath.Join(e.dir, "keybroker.pub")
	if err := os.WriteFile(e.kbPubFile, pem, 0o644); err != nil {
		t.Fatal(err)
	}

	e.conn = e.connect("broker", natsauth.InboxPrefix(natsauth.RoleBroker, ""))
	// JetStream only through the broker's store user: the serving user has no JetStream rights.
	if e.js, err = jetstream.New(e.connect("broker-store", natsauth.InboxPrefix(natsauth.RoleBrokerStore, ""))); err != nil {
		t.Fatal(err)
	}
	e.agents = agentapi.NewClient(e.conn, 20*time.Second)
	e.kbc = broker.NewKeyBrokerClient(e.conn, 20*time.Second)
	e.demoNC = e.connect("tenant-"+demoTenant, natsauth.InboxPrefix(natsauth.RoleTenant, demoTenant))
	e.otherNC = e.connect("tenant-"+otherTenant, natsauth.InboxPrefix(natsauth.RoleTenant, otherTenant))
	e.demo = broker.NewTenantClient(e.demoNC, demoTenant)
	e.other = broker.NewTenantClient(e.otherNC, otherTenant)
	e.ops = broker.NewOperatorClient(e.connect("operator", natsauth.InboxPrefix(natsauth.RoleOperator, "")))

	for _, id := range []string{"broker-1", "broker-2"} {
		e.startBroker(id)
	}
	e.waitBuckets()

	y, err := os.ReadFile("../examples/policies/ci-emulated.yaml")
	if err != nil {
		t.Fatal(err)
	}
	e.basePolicy = withSVN(y, basePolicySVN)
	// As lethectl policy apply: published to the keybroker (the floor), then applied.
	base := e.sign(e.basePolicy, e.demoKey)
	if _, err := e.kb.PublishPolicy(ctx, &kbwire.PublishPolicyRequest{Policy: base}); err != nil {
		t.Fatalf("publishing the tenant policy: %v", err)
	}
	if _, err := e.demo.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Envelope: base}); err != nil {
		t.Fatalf("applying the tenant policy: %v", err)
	}
	return e
}

// logOrigin is the residency log's origin: the in-process keybroker's, or, where the
// keybrokers are processes (TestCluster), the default they run with.
func (e *env) logOrigin() string {
	if e.kb == nil {
		return keybroker.DefaultLogOrigin
	}
	return e.kb.LogOrigin()
}

func (e *env) password(login string) string {
	pw := "pw-" + rand.Text()
	e.passwords[login] = pw
	return pw
}

// connect connects to NATS as login, reconnecting for ever, and closes the connection when the
// test ends.
func (e *env) connect(login, inbox string) *nats.Conn {
	e.t.Helper()
	nc, err := nats.Connect(e.nats.URL, nats.UserInfo(login, e.passwords[login]), nats.CustomInboxPrefix(inbox),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond), nats.Name("e2e "+login))
	if err != nil {
		e.t.Fatalf("connecting to NATS as %s: %v", login, err)
	}
	e.t.Cleanup(nc.Close)
	return nc
}

// background runs f until the test ends.
func (e *env) background(name string, f func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			e.t.Errorf("%s: %v", name, err)
		}
	})
}

// adminRequest signs req as the operator's tenant.register request with the admin key.
func (e *env) adminRequest(req kbwire.RegisterTenantRequest) *kbwire.AdminRequest {
	e.t.Helper()
	signed, err := kbwire.SignAdmin(kbwire.OpTenantRegister, req, time.Now(), time.Minute, e.adminKey)
	if err != nil {
		e.t.Fatal(err)
	}
	return &kbwire.AdminRequest{Signed: signed}
}

// sign signs a policy with key and returns the envelope.
func (e *env) sign(y []byte, key ed25519.PrivateKey) []byte {
	e.t.Helper()
	signed, err := policy.Sign("policy.yaml", y, key)
	if err != nil {
		e.t.Fatalf("signing policy: %v", err)
	}
	b, err := signed.Marshal()
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// proc is a daemon running as a child process.
type proc struct {
	name string
	args []string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

// spawn starts binary with args, logging to a file of the environment's directory; the
// process is stopped when the test ends.
func (e *env) spawn(name, binary string, args ...string) *proc {
	e.t.Helper()
	p := &proc{name: name, args: append([]string{binary}, args...), log: filepath.Join(e.dir, name+".log")}
	e.start(p)
	e.t.Cleanup(p.stop)
	return p
}

func (e *env) start(p *proc) {
	e.t.Helper()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(binDir, p.args[0]), p.args[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		e.t.Fatalf("starting %s: %v", p.name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(done)
	}()
	p.cmd, p.done = cmd, done
}

// restart starts a stopped process again with the same arguments.
func (e *env) restart(p *proc) {
	e.t.Helper()
	p.stop()
	e.start(p)
}

// kill ends the process with SIGKILL, as a crash would, and waits for it.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// stop asks the process to stop (SIGTERM) and kills it if it has not within 10 s.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// tail returns the end of the process's log, for failure messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

func (e *env) startBroker(id string) *proc {
	e.t.Helper()
	p := e.spawn(id, "lethe-broker",
		"--nats-url", e.nats.URL, "--user", "broker", "--password", e.passwords["broker"],
		"--store-user", "broker-store", "--store-password", e.passwords["broker-store"], "--id", id,
		"--lease", lease.String(), "--check-interval", "200ms", "--host-ttl", hostTTL.String(),
		"--agent-timeout", "10s", "--start-timeout", "30s", "--progress-timeout", "20s")
	e.mu.Lock()
	e.brokers[id] = p
	e.mu.Unlock()
	return p
}

// waitBuckets waits until a broker has created the JetStream buckets.
func (e *env) waitBuckets() {
	e.t.Helper()
	poll(e.t, "the brokers' buckets", func() (bool, string) {
		for _, b := range []string{broker.MigrationsBucket, broker.HostsBucket, broker.GuestsBucket} {
			if _, err := e.js.KeyValue(e.t.Context(), b); err != nil {
				return false, fmt.Sprintf("bucket %s: %v", b, err)
			}
		}
		return true, ""
	})
	poll(e.t, "the broker API", func() (bool, string) {
		_, err := e.demo.ListHosts(e.t.Context(), &broker.ListHostsRequest{})
		return err == nil, fmt.Sprint(err)
	})
}

// poll calls cond every 20 ms until it holds, and fails t after waitLimit with cond's last
// explanation.
func poll(t testing.TB, what string, cond func() (bool, string)) {
	t.Helper()
	if err := pollErr(t.Context(), waitLimit, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// pollErr calls cond every 20 ms until it holds, or returns an error after limit.
func pollErr(ctx context.Context, limit time.Duration, cond func() (bool, string)) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var why string
	for {
		var ok bool
		if ok, why = cond(); ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not within %v: %s", limit, why)
		case <-tick.C:
		}
	}
}

// getKV reads key of bucket as JSON; ok is false if it does not exist.
func getKV[T any](ctx context.Context, js jetstream.JetStream, bucket, key string) (*T, bool, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, false, fmt.Errorf("opening bucket %s: %w", bucket, err)
	}
	entry, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("reading %s/%s: %w", bucket, key, err)
	}
	var v T
	if err := json.Unmarshal(entry.Value(), &v); err != nil {
		return nil, false, fmt.Errorf("decoding %s/%s: %w", bucket, key, err)
	}
	return &v, true, nil
}

// listKV reads every value of bucket.
func listKV[T any](ctx context.Context, js jetstream.JetStream, bucket string) ([]T, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("opening bucket %s: %w", bucket, err)
	}
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", bucket, err)
	}
	var out []T
	for k := range lister.Keys() {
		entry, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s/%s: %w", bucket, k, err)
		}
		var v T
		if err := json.Unmarshal(entry.Value(), &v); err != nil {
			return nil, fmt.Errorf("decoding %s/%s: %w", bucket, k, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// migration reads a migration record.
func (e *env) migration(ctx context.Context, id string) (*broker.Migration, error) {
	m, ok, err := getKV[broker.Migration](ctx, e.js, broker.MigrationsBucket, id)
	if err == nil && !ok {
		err = fmt.Errorf("migration %s: no record", id)
	}
	return m, err
}

// watchMigration calls f with every version of migration id's record until f returns true,
// and fails t after waitLimit.
//
// The watch is an ordered consumer, which a cluster can leave silent: its creation may go
// unanswered after a node was killed (seen for a minute), and its recreation after a fault
// may fail for good. So each creation is bounded by watchCallTimeout, and the record is
// also read every watchPollInterval: f sees every version while the watch works, and the
// current one at least every watchPollInterval when it does not.
func (e *env) watchMigration(t testing.TB, id string, f func(*broker.Migration) bool) *broker.Migration {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitLimit)
	defer cancel()
	var last *broker.Migration
	var rev uint64
	see := func(entry jetstream.KeyValueEntry) *broker.Migration {
		var m broker.Migration
		if entry.Revision() <= rev || json.Unmarshal(entry.Value(), &m) != nil {
			return nil
		}
		rev, last = entry.Revision(), &m
		if f(&m) {
			return &m
		}
		return nil
	}
	for {
		if kv, err := e.bucket(ctx, broker.MigrationsBucket); err == nil {
			wctx, wcancel := context.WithCancel(ctx)
			w := watchKey(wctx, kv, id)
			m := e.follow(ctx, kv, id, w, see)
			wcancel()
			if m != nil {
				return m
			}
		}
		if ctx.Err() != nil {
			b, _ := json.Marshal(last)
			t.Fatalf("migration %s: condition not met within %v; last record %s", id, waitLimit, b)
		}
		// The watch could not be made, or ended (NATS restarted): watch again.
		select {
		case <-ctx.Done():
		case <-time.After(watchPollInterval):
		}
	}
}

const (
	// watchCallTimeout bounds the creation of a watch and each read of a record.
	watchCallTimeout = 5 * time.Second
	// watchPollInterval is how often watchMigration reads the record beside its watch.
	watchPollInterval = time.Second
)

// watchKey watches key of kv until ctx ends, or returns nil if the watch is not made within
// watchCallTimeout. The watch lives as long as the context its creation is given, so that
// context is not the bounded one: the caller cancels ctx, which also cancels a creation left
// unanswered.
func watchKey(ctx context.Context, kv jetstream.KeyValue, key string) jetstream.KeyWatcher {
	ch := make(chan jetstream.KeyWatcher, 1)
	go func() {
		w, err := kv.Watch(ctx, key)
		if err != nil {
			w = nil
		}
		ch <- w
	}()
	select {
	case w := <-ch:
		return w
	case <-time.After(watchCallTimeout):
		return nil
	}
}

// bucket opens bucket, within watchCallTimeout.
func (e *env) bucket(ctx context.Context, bucket string) (jetstream.KeyValue, error) {
	ctx, cancel := context.WithTimeout(ctx, watchCallTimeout)
	defer cancel()
	return e.js.KeyValue(ctx, bucket)
}

// follow passes to see each version of key that w (nil: none) delivers, and the current one
// every watchPollInterval, until see returns a record, ctx ends, w ends, or ten reads in a row
// find a version the watch has not delivered.
func (e *env) follow(ctx context.Context, kv jetstream.KeyValue, key string, w jetstream.KeyWatcher, see func(jetstream.KeyValueEntry) *broker.Migration) *broker.Migration {
	var updates <-chan jetstream.KeyValueEntry
	if w != nil {
		defer w.Stop()
		updates = w.Updates()
	}
	tick := time.NewTicker(watchPollInterval)
	defer tick.Stop()
	// stale counts the reads in a row that found a version newer than the watch delivered.
	var watched uint64
	stale := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case entry, ok := <-updates:
			if !ok {
				return nil
			}
			if entry == nil || entry.Operation() != jetstream.KeyValuePut {
				continue
			}
			watched, stale = entry.Revision(), 0
			if m := see(entry); m != nil {
				return m
			}
		case <-tick.C:
			rctx, cancel := context.WithTimeout(ctx, watchCallTimeout)
			entry, err := kv.Get(rctx, key)
			cancel()
			if err != nil {
				continue
			}
			if m := see(entry); m != nil {
				return m
			}
			if entry.Revision() > watched {
				stale++
			}
			if w == nil || stale >= 10 {
				return nil
			}
		}
	}
}

// hostRecords reads every host record.
func (e *env) hostRecords(ctx context.Context) ([]agentapi.HostRecord, error) {
	return listKV[agentapi.HostRecord](ctx, e.js, broker.HostsBucket)
}

// withSVN sets a policy's policySvn.
func withSVN(y []byte, svn int) []byte {
	return replaceLine(y, "  policySvn:", fmt.Sprintf("  policySvn: %d", svn))
}

// replaceLine replaces the line starting with prefix by line.
func replaceLine(y []byte, prefix, line string) []byte {
	lines := strings.Split(string(y), "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, prefix) {
			lines[i] = line
		}
	}
	return []byte(strings.Join(lines, "\n"))
}

// insertAfter inserts text after the first line equal to after within the section starting
// with the line section.
func insertAfter(y []byte, section, after, text string) []byte {
	lines := strings.Split(string(y), "\n")
	in := false
	for i, l := range lines {
		if l == section {
			in = true
		}
		if in && l == after {
			lines = slices.Insert(lines, i+1, strings.Split(strings.TrimSuffix(text, "\n"), "\n")...)
			break
		}
	}
	return []byte(strings.Join(lines, "\n"))
}

// agentSpec describes an agent process.
type agentSpec struct {
	platform attest.Platform
	// tcb is the emulated SEV-SNP TCB (bl=…) or TDX TEE TCB SVN (hex); empty: the default.
	tcb    string
	labels string
	guests []string // VM names of tenant demo, each of size (empty: guestSize)
	size   string
	// allocatable is the memory the host offers guests (--allocatable-memory); empty: all of
	// the machine's.
	allocatable string
	// relay puts a relay the test controls in front of the agent's data-plane listener.
	relay bool
	// extra flags.
	extra []string
}

const (
	snpBase   = "bl=3,tee=0,snp=8,ucode=115"
	snpHigher = "bl=4,tee=0,snp=9,ucode=120"
	snpWeak   = "bl=3,tee=0,snp=8,ucode=100"
	// tdxBase is the emulator's TDX module SVN, the up-to-date level of its TCB info.
	tdxBase = "05010200000000000000000000000000"
)

func snp(tcb string, guests ...string) agentSpec {
	return agentSpec{platform: attest.PlatformEmulatedSEVSNP, tcb: tcb, guests: guests}
}

func tdx(tcb string, guests ...string) agentSpec {
	return agentSpec{platform: attest.PlatformEmulatedTDX, tcb: tcb, guests: guests}
}

// agent is an agent process.
type agent struct {
	host  string
	spec  agentSpec
	proc  *proc
	relay *relay
}

// startAgent starts an agent process on a fresh host name and waits for its host record.
func (e *env) startAgent(t testing.TB, spec agentSpec) *agent {
	t.Helper()
	e.mu.Lock()
	if e.nextHost == len(e.hosts) {
		e.mu.Unlock()
		t.Fatal("out of agent host names")
	}
	host := e.hosts[e.nextHost]
	e.nextHost++
	e.nextIP++
	n := e.nextIP
	e.mu.Unlock()
	// Every data-plane listener is on an address of 127.77.0.0/16, which the capture watches.
	dataIP := fmt.Sprintf("127.77.%d.%d", n/250, n%250+1)
	args := []string{
		"--host", host, "--nats-url", e.nats.URL, "--user", "agent-" + host, "--password", e.passwords["agent-"+host],
		"--attestation", spec.platform.String(), "--allow-emulated", "--emulator-dir", e.emuDir,
		"--keybroker-pub", e.kbPubFile,
		"--region", "eu", "--workload-rate", "2000", "--streams", "2", "--heartbeat-interval", "300ms",
		"--log-format", "json",
	}
	labels := "zone=test"
	if spec.labels != "" {
		labels = spec.labels
	}
	args = append(args, "--labels", labels)
	switch {
	case spec.tcb == "":
	case spec.platform == attest.PlatformEmulatedTDX:
		args = append(args, "--emulated-tee-tcb-svn", spec.tcb)
	default:
		args = append(args, "--emulated-tcb", spec.tcb)
	}
	if spec.allocatable != "" {
		args = append(args, "--allocatable-memory", spec.allocatable)
	}
	for _, g := range spec.guests {
		args = append(args, "--guest", demoTenant+"/"+g+"="+cmp.Or(spec.size, guestSize))
	}
	a := &agent{host: host, spec: spec}
	if spec.relay {
		// A fixed port, advertised on the relay's address: the source dials the relay.
		relayIP := fmt.Sprintf("127.77.%d.%d", 200+n/250, n%250+1)
		port := freePort(t, dataIP)
		args = append(args, "--data-listen", net.JoinHostPort(dataIP, port), "--data-advertise", relayIP)
		a.relay = startRelay(t, net.JoinHostPort(relayIP, port), net.JoinHostPort(dataIP, port))
	} else {
		args = append(args, "--data-listen", dataIP+":0")
	}
	args = append(args, spec.extra...)
	a.proc = e.spawn(host, "lethe-agent", args...)
	t.Cleanup(a.proc.stop)
	e.waitAgent(t, a)
	return a
}

// waitAgent waits until the agent's host record is fresh and lists its guests.
func (e *env) waitAgent(t testing.TB, a *agent) {
	t.Helper()
	since := time.Now()
	poll(t, "agent "+a.host, func() (bool, string) {
		if !a.proc.running() {
			t.Fatalf("agent %s exited:\n%s", a.host, a.proc.tail())
		}
		rec, ok, err := getKV[agentapi.HostRecord](t.Context(), e.js, broker.HostsBucket, a.host)
		if err != nil || !ok {
			return false, fmt.Sprintf("no host record (%v)", err)
		}
		if rec.Heartbeat.Before(since.Add(-time.Second)) {
			return false, "stale host record"
		}
		for _, g := range a.spec.guests {
			if rec.Guest(demoTenant, g) == nil {
				return false, "guest " + g + " not in the host record"
			}
		}
		return true, ""
	})
}

// connectAsAgent connects with a's NATS user and inbox, as a compromised agent would, until t
// ends; the channel receives the asynchronous errors (permission violations) the server
// reports.
func (e *env) connectAsAgent(t testing.TB, a *agent) (*nats.Conn, <-chan error) {
	t.Helper()
	login := "agent-" + a.host
	perm := make(chan error, 4)
	nc, err := nats.Connect(e.nats.URL, nats.UserInfo(login, e.passwords[login]), nats.CustomInboxPrefix(natsauth.InboxPrefix(natsauth.RoleAgent, a.host)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case perm <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc, perm
}

func freePort(t testing.TB, ip string) string {
	t.Helper()
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// auditLog is the keybroker's audit sink: it records every event.
type auditLog struct {
	mu     sync.Mutex
	events []keybroker.Event
	// read, if set, returns every event so far from where the keybrokers record them (the
	// logs of keybroker processes, in TestCluster); of calls it before each lookup.
	read func() []keybroker.Event
}

// Audit implements keybroker.AuditSink.
func (a *auditLog) Audit(_ context.Context, ev keybroker.Event) {
	a.mu.Lock()
	a.events = append(a.events, ev)
	a.mu.Unlock()
}

// of returns the events of a migration (or adoption) id.
func (a *auditLog) of(id string) []keybroker.Event {
	if a.read != nil {
		evs := a.read()
		a.mu.Lock()
		a.events = evs
		a.mu.Unlock()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []keybroker.Event
	for _, ev := range a.events {
		if ev.MigrationID == id {
			out = append(out, ev)
		}
	}
	return out
}

// transitKeys lists the Transit keys straight from Vault (not through the proxy).
func (e *env) transitKeys(ctx context.Context) ([]string, error) {
	s, err := e.vault.Client.Logical().ListWithContext(ctx, vaulttest.TransitMount+"/keys")
	if err != nil {
		return nil, fmt.Errorf("listing transit keys: %w", err)
	}
	if s == nil {
		return nil, nil
	}
	raw, _ := s.Data["keys"].([]any)
	var out []string
	for _, k := range raw {
		if name, ok := k.(string); ok {
			out = append(out, name)
		}
	}
	return out, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
