package e2e

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/clustertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/policy"
)

// cluster is the environment of TestCluster: the suite's env, on a three-node NATS cluster
// with R3 buckets and a three-node Vault HA cluster, with two keybroker processes.
type cluster struct {
	*env
	natsc  *clustertest.NATS
	vaultc *clustertest.VaultHA
	kbs    []*proc

	auditMu sync.Mutex
}

// clusters finds the cluster of a scenario's env, for the faults.
var clusters sync.Map // *env → *cluster

func clusterOf(s *scn) *cluster {
	c, _ := clusters.Load(s.env)
	return c.(*cluster)
}

// migrationsStream is the stream of the migrations bucket, whose leader the faults kill.
var migrationsStream = "KV_" + broker.MigrationsBucket

// TestCluster runs migrations through faults that only a cluster has: NATS stream and meta
// leaders killed, a NATS node partitioned, JetStream's quorum lost and regained, a broker and
// a keybroker killed mid-migration, the Vault leader killed. Each scenario's migration must
// end as wanted, the suite's invariants must hold, and a new migration of the guest must
// commit afterwards.
func TestCluster(t *testing.T) {
	c := newCluster(t)
	scenarios := []struct {
		name string
		run  func(*scn)
	}{
		{"nats-stream-leader-killed", fault(atTransferring, killStreamLeader)},
		{"nats-meta-leader-killed", fault(atTransferring, killMetaLeader)},
		{"nats-node-partitioned", fault(atTransferring, partitionStreamLeader)},
		{"jetstream-quorum-lost", fault(atTransferring, loseQuorum)},
		{"broker-killed", fault(atTransferring, killBroker)},
		{"keybroker-killed-mid-release", killKeybrokerAtRelease},
		{"keybroker-killed-mid-destroy", fault(atTransferring, killKeybrokerAtDestroy)},
		{"vault-leader-killed", fault(atTransferring, killVaultLeader)},
	}
	start := time.Now()
	for i, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			s := &scn{
				env: c.env, t: t, index: i + 1,
				guests: map[string]*guestWant{}, vmPolicies: map[string]bool{}, noProbe: map[string]string{},
			}
			// Whatever the scenario did, the next one starts on a whole, healthy cluster; a
			// scenario that stopped short is restored by the cleanup.
			restored := false
			t.Cleanup(func() {
				if !restored {
					c.restore(t)
				}
			})
			sc.run(s)
			c.restore(t)
			restored = true
			// check then probe: the probe is the new migration that must commit after the fault.
			bad := s.check()
			bad = append(bad, s.probe()...)
			for _, b := range bad {
				t.Error(b)
			}
			t.Logf("%s: %s", sc.name, s.outcome)
		})
	}
	t.Logf("cluster suite ran in %v", time.Since(start).Round(time.Second))
}

// killStreamLeader kills the NATS node that leads the migrations stream while the migration
// transfers; it comes back once the migration ended.
func killStreamLeader(fc *faultCtx) func() {
	c := clusterOf(fc.s)
	i := c.natsc.StreamLeader(migrationsStream)
	fc.s.t.Logf("killing NATS node %s, leader of %s", c.natsc.Name(i), migrationsStream)
	c.natsc.Kill(i)
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		fc.s.end(fc.id)
		c.natsc.Restart(i)
	}
}

// killMetaLeader kills the NATS node that leads JetStream's meta group.
func killMetaLeader(fc *faultCtx) func() {
	c := clusterOf(fc.s)
	i := c.natsc.MetaLeader()
	fc.s.t.Logf("killing NATS node %s, the meta leader", c.natsc.Name(i))
	c.natsc.Kill(i)
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		fc.s.end(fc.id)
		c.natsc.Restart(i)
	}
}

// partitionStreamLeader cuts the leader of the migrations stream off from the other nodes
// while the migration transfers; its clients stay connected to it. The partition lasts until
// the other two nodes elected a new leader of the stream: agents and brokers connected to the
// cut node are unreachable meanwhile, and the migration must go on once it is healed, without
// a write of the stale leader's side.
func partitionStreamLeader(fc *faultCtx) func() {
	c := clusterOf(fc.s)
	i := c.natsc.StreamLeader(migrationsStream)
	fc.s.t.Logf("partitioning NATS node %s, leader of %s", c.natsc.Name(i), migrationsStream)
	c.natsc.Partition(i)
	fc.s.t.Cleanup(func() { c.natsc.Heal(i) })
	j := c.natsc.StreamLeaderWithout(migrationsStream, i)
	fc.s.t.Logf("NATS node %s leads %s without %s; healing", c.natsc.Name(j), migrationsStream, c.natsc.Name(i))
	c.natsc.Heal(i)
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		fc.s.end(fc.id)
	}
}

// loseQuorum kills two of the three NATS nodes, the stream leader among them, and starts them
// again one by one: JetStream has no quorum until the first is back.
func loseQuorum(fc *faultCtx) func() {
	c := clusterOf(fc.s)
	i := c.natsc.StreamLeader(migrationsStream)
	j := (i + 1) % 3
	fc.s.t.Logf("killing NATS nodes %s and %s", c.natsc.Name(i), c.natsc.Name(j))
	c.natsc.Kill(i)
	c.natsc.Kill(j)
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		c.natsc.Restart(i)
		c.natsc.Restart(j)
	}
}

// killKeybrokerAtRelease kills one keybroker process the moment the broker asks for the
// keys' release: a copy of the request, on the keybroker API's subject, is the signal. When
// the killed keybroker was the one serving it, the broker gets no answer and runs the step
// again (new nonces, new evidence), which the other keybroker serves; when it was the other,
// the release completes. Either way the migration must commit. The queue group picks the
// keybroker, so the scenario migrates the guest again, to a new destination, until a second
// release request shows that the killed keybroker held the first, up to releaseKillTries
// times.
func killKeybrokerAtRelease(s *scn) {
	c := clusterOf(s)
	vm := s.vm("g")
	src := s.agent(snp(snpBase, vm))
	s.adopt(vm, src)

	nc := s.connect("keybroker", natsauth.InboxPrefix(natsauth.RoleKeybroker, ""))
	defer nc.Close()
	var mu sync.Mutex
	requests := 0
	killed := make(chan struct{}, 1)
	sub, err := nc.Subscribe(kbwire.SubjectPrefix+"."+kbwire.OpRelease, func(msg *nats.Msg) {
		var req struct {
			VM string `json:"vm"`
		}
		if json.Unmarshal(msg.Data, &req) != nil || req.VM != vm {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if requests++; requests == 1 {
			c.kbs[0].kill()
			killed <- struct{}{}
		}
	})
	if err != nil {
		s.t.Fatalf("watching the release requests: %v", err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		s.t.Fatal(err)
	}
	for try := 1; ; try++ {
		mu.Lock()
		requests = 0
		mu.Unlock()
		dst := s.agent(snp(snpHigher))
		id := s.migrate(vm, dst)
		select {
		case <-killed:
		case <-time.After(waitLimit):
			s.t.Fatal("the broker asked for no release")
		}
		m := s.requireEnd(id, vm, broker.OutcomeErased, src, dst)
		s.outcome = m.Outcome
		mu.Lock()
		n := requests
		mu.Unlock()
		if n > 1 {
			s.t.Logf("try %d: %s held the release request of %s; the broker asked %d times", try, c.kbs[0].name, id, n)
			s.outcome += fmt.Sprintf(" (the killed keybroker held the release; %d requests)", n)
			return
		}
		s.t.Logf("try %d: %s was killed at the release request of %s, which the other keybroker held", try, c.kbs[0].name, id)
		if try == releaseKillTries {
			s.outcome += fmt.Sprintf(" (the other keybroker held the release %d times)", try)
			return
		}
		c.restart(c.kbs[0])
		c.waitKeybroker(s.t, c.kbs[0])
		src = dst
	}
}

// releaseKillTries bounds the migrations of killKeybrokerAtRelease: the killed keybroker
// holds the release in one of two, so it holds none of them once in 64.
const releaseKillTries = 6

// killKeybrokerAtDestroy kills one keybroker process as the migration commits, when the
// broker asks for the migration key's destruction.
func killKeybrokerAtDestroy(fc *faultCtx) func() {
	c := clusterOf(fc.s)
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		fc.s.phase(fc.id, broker.PhaseCommitted)
		c.kbs[1].kill()
		fc.s.end(fc.id)
		c.restart(c.kbs[1])
		c.waitKeybroker(fc.s.t, c.kbs[1])
	}
}

// killVaultLeader kills the active Vault node while the migration transfers: its key's
// destruction must wait for the new leader.
func killVaultLeader(fc *faultCtx) func() {
	c := clusterOf(fc.s)
	i := c.vaultc.Leader()
	fc.s.t.Logf("killing Vault node %d, the leader", i)
	c.vaultc.Kill(i)
	fc.wantOutcome = broker.OutcomeErased
	return func() {
		fc.s.end(fc.id)
		c.vaultc.Restart(i)
	}
}

// newCluster starts the clusters, two keybroker and two broker processes, registers the
// tenants and applies the base policy.
func newCluster(t testing.TB) *cluster {
	t.Helper()
	ctx := t.Context()
	e := &env{
		t: t, dir: t.TempDir(), passwords: map[string]string{}, brokers: map[string]*proc{},
		audit: &auditLog{},
		// Not in front of anything: the cluster suite cuts nodes, not the keybrokers' Vault.
		vproxy: &vaulttest.Proxy{},
	}
	c := &cluster{env: e}
	e.audit.read = c.readAudit
	clusters.Store(e, c)
	t.Cleanup(func() { clusters.Delete(e) })
	e.log = slog.New(slog.DiscardHandler)
	// A failure shows the end of every daemon's log but the agents'.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, p := range append(c.kbs, c.brokerProcs()...) {
			t.Logf("%s's log ends:\n%s", p.name, p.tail())
		}
		for i := range 3 {
			if c.natsc != nil {
				t.Logf("NATS node %s's log ends:\n%s", c.natsc.Name(i), c.natsc.Logs(i))
			}
		}
	})
	buildKeybroker(t)

	users := []natsauth.User{
		{Role: natsauth.RoleBroker, Password: e.password("broker")},
		{Role: natsauth.RoleBrokerStore, Password: e.password("broker-store")},
		{Role: natsauth.RoleKeybroker, Password: e.password("keybroker")},
		{Role: natsauth.RoleTenant, Name: demoTenant, Password: e.password("tenant-" + demoTenant)},
		{Role: natsauth.RoleOperator, Password: e.password("operator")},
	}
	for i := range 60 {
		h := fmt.Sprintf("h%03d", i+1)
		e.hosts = append(e.hosts, h)
		users = append(users, natsauth.User{Role: natsauth.RoleAgent, Name: h, Password: e.password("agent-" + h)})
	}
	c.natsc = clustertest.StartNATS(t, clustertest.NATSOptions{Users: users})
	// The env's helpers read the servers' URL alone.
	e.nats = &natstest.Server{URL: c.natsc.URL}
	c.vaultc = clustertest.StartVaultHA(t)
	e.vault = &vaulttest.Server{Addr: c.vaultc.Addr, Token: c.vaultc.Token, Client: c.vaultc.Client()}

	e.emuDir = filepath.Join(e.dir, "emulator")
	for _, p := range []attest.Platform{attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX} {
		if _, err := emulate.Open(e.emuDir, p, emulate.Options{}); err != nil {
			t.Fatalf("creating the %s emulator: %v", p, err)
		}
	}
	adminPub, adminKey, _ := ed25519.GenerateKey(rand.Reader)
	e.adminKey = adminKey
	adminPEM, err := policy.MarshalPublicKey(adminPub)
	if err != nil {
		t.Fatal(err)
	}
	adminFile := filepath.Join(e.dir, "admin.pub")
	tokenFile := filepath.Join(e.dir, "vault.token")
	for f, b := range map[string][]byte{adminFile: adminPEM, tokenFile: []byte(c.vaultc.Token)} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	// The receipt-signing key, made in Vault once, as lethe-keybroker --export-pub does.
	e.kbPubFile = filepath.Join(e.dir, "keybroker.pub")
	export := exec.Command(filepath.Join(binDir, "lethe-keybroker"), "--vault-addr", c.vaultc.Addr, "--vault-token-file", tokenFile,
		"--state-dir", filepath.Join(e.dir, "keybroker-pub"), "--export-pub", e.kbPubFile)
	if out, err := export.CombinedOutput(); err != nil {
		t.Fatalf("exporting the keybroker's key: %v\n%s", err, out)
	}
	pem, err := os.ReadFile(e.kbPubFile)
	if err != nil {
		t.Fatal(err)
	}
	if e.kbPub, err = receipt.ParsePublicKeyPEM(pem); err != nil {
		t.Fatal(err)
	}

	for i := range 2 {
		id := fmt.Sprintf("keybroker-%d", i+1)
		p := e.spawn(id, "lethe-keybroker",
			"--nats-url", c.natsc.URL, "--user", "keybroker", "--password", e.passwords["keybroker"],
			"--vault-addr", c.vaultc.Addr, "--vault-token-file", tokenFile, "--admin-pub", adminFile,
			"--state-dir", filepath.Join(e.dir, id), "--trust-roots", e.emuDir, "--allow-emulated",
			"--id", id, "--log-format", "json", "--metrics-listen", "127.0.0.1:"+freePort(t, "127.0.0.1"))
		c.kbs = append(c.kbs, p)
		c.waitKeybroker(t, p)
	}

	e.conn = e.connect("broker", natsauth.InboxPrefix(natsauth.RoleBroker, ""))
	if e.js, err = jetstream.New(e.connect("broker-store", natsauth.InboxPrefix(natsauth.RoleBrokerStore, ""))); err != nil {
		t.Fatal(err)
	}
	e.agents = agentapi.NewClient(e.conn, 20*time.Second)
	e.kbc = broker.NewKeyBrokerClient(e.conn, 20*time.Second)
	e.demoNC = e.connect("tenant-"+demoTenant, natsauth.InboxPrefix(natsauth.RoleTenant, demoTenant))
	e.demo = broker.NewTenantClient(e.demoNC, demoTenant)
	opsNC := e.connect("operator", natsauth.InboxPrefix(natsauth.RoleOperator, ""))
	e.ops = broker.NewOperatorClient(opsNC)

	demoPub, demoKey, _ := ed25519.GenerateKey(rand.Reader)
	e.demoKey = demoKey
	signed, err := kbwire.SignAdmin(kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: demoTenant, PolicyKey: demoPub}, time.Now(), time.Minute, adminKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kbclient.New(opsNC, 20*time.Second).RegisterTenant(ctx, signed); err != nil {
		t.Fatalf("registering tenant %s: %v", demoTenant, err)
	}

	// Both brokers at once: each creates the R3 buckets.
	c.startBroker("broker-1")
	c.startBroker("broker-2")
	e.waitBuckets()

	y, err := os.ReadFile("../examples/policies/ci-emulated.yaml")
	if err != nil {
		t.Fatal(err)
	}
	e.basePolicy = withSVN(y, basePolicySVN)
	base := e.sign(e.basePolicy, e.demoKey)
	if _, err := kbclient.New(e.demoNC, 20*time.Second).PublishPolicy(ctx, base); err != nil {
		t.Fatalf("publishing the tenant policy: %v", err)
	}
	if _, err := e.demo.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Envelope: base}); err != nil {
		t.Fatalf("applying the tenant policy: %v", err)
	}
	return c
}

// startBroker starts a broker process as env.startBroker does, with R3 buckets and a 30 s
// progress timeout: a partition lasts until the other nodes elected new leaders, which has
// taken close to 20 s here, and a migration held through it must still be within its
// transfer limit once it heals.
func (c *cluster) startBroker(id string) {
	c.t.Helper()
	p := c.spawn(id, "lethe-broker",
		"--nats-url", c.natsc.URL, "--user", "broker", "--password", c.passwords["broker"],
		"--store-user", "broker-store", "--store-password", c.passwords["broker-store"], "--id", id,
		"--replicas", "3",
		"--lease", lease.String(), "--check-interval", "200ms", "--host-ttl", hostTTL.String(),
		"--agent-timeout", "10s", "--start-timeout", "30s", "--progress-timeout", "30s")
	c.mu.Lock()
	c.brokers[id] = p
	c.mu.Unlock()
}

func (c *cluster) brokerProcs() []*proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ps []*proc
	for _, p := range c.brokers {
		ps = append(ps, p)
	}
	return ps
}

// restore undoes what a scenario did: it heals the NATS partitions, starts every NATS node,
// Vault node, keybroker and broker that does not run, and waits until the NATS cluster is
// healthy (a meta leader, every stream led with its replicas current), Vault has a leader,
// the keybrokers are ready and the broker API answers.
func (c *cluster) restore(t testing.TB) {
	t.Helper()
	// Not t.Context(): a cleanup runs after it ends.
	ctx := context.WithoutCancel(t.Context())
	c.natsc.Restore()
	c.vaultc.Restore()
	for _, p := range c.kbs {
		if !p.running() {
			t.Logf("restarting %s", p.name)
			c.restart(p)
		}
		c.waitKeybrokerCtx(ctx, t, p)
	}
	for _, p := range c.brokerProcs() {
		if !p.running() {
			t.Logf("restarting %s", p.name)
			c.restart(p)
		}
	}
	err := pollErr(ctx, waitLimit, func() (bool, string) {
		_, err := c.demo.ListHosts(ctx, &broker.ListHostsRequest{})
		return err == nil, fmt.Sprint(err)
	})
	if err != nil {
		t.Fatalf("waiting for the broker API: %v", err)
	}
}

// waitKeybroker waits until the keybroker process p is ready (its /readyz).
func (c *cluster) waitKeybroker(t testing.TB, p *proc) {
	t.Helper()
	c.waitKeybrokerCtx(t.Context(), t, p)
}

// waitKeybrokerCtx is waitKeybroker within ctx.
func (c *cluster) waitKeybrokerCtx(ctx context.Context, t testing.TB, p *proc) {
	t.Helper()
	var addr string
	for i, a := range p.args {
		if a == "--metrics-listen" {
			addr = p.args[i+1]
		}
	}
	err := pollErr(ctx, waitLimit, func() (bool, string) {
		if !p.running() {
			t.Fatalf("%s exited:\n%s", p.name, p.tail())
		}
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
	if err != nil {
		t.Fatalf("waiting for %s ready: %v", p.name, err)
	}
}

// readAudit reads the audit events from the keybroker processes' logs (one JSON record each,
// message "Audit"), for the env's audit log.
func (c *cluster) readAudit() []keybroker.Event {
	c.auditMu.Lock()
	defer c.auditMu.Unlock()
	var events []keybroker.Event
	for _, p := range c.kbs {
		f, err := os.Open(p.log)
		if err != nil {
			c.t.Errorf("reading the audit events: %v", err)
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var rec struct {
				Msg       string `json:"msg"`
				Event     string `json:"event"`
				Migration string `json:"migration"`
				Tenant    string `json:"tenant"`
				VM        string `json:"vm"`
				Decision  string `json:"decision"`
			}
			if !strings.Contains(sc.Text(), `"msg":"Audit"`) || json.Unmarshal(sc.Bytes(), &rec) != nil || rec.Msg != "Audit" {
				continue
			}
			events = append(events, keybroker.Event{
				Kind: keybroker.EventKind(rec.Event), MigrationID: rec.Migration, Tenant: rec.Tenant, VM: rec.VM,
				Decision: keybroker.Decision(rec.Decision),
			})
		}
		if err := sc.Err(); err != nil {
			c.t.Errorf("reading the audit events of %s: %v", p.name, err)
		}
		f.Close()
	}
	return events
}

var buildKeybrokerOnce sync.Once

// buildKeybroker builds lethe-keybroker beside the daemons TestMain builds.
func buildKeybroker(t testing.TB) {
	t.Helper()
	var err error
	var out []byte
	buildKeybrokerOnce.Do(func() {
		cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, "lethe-keybroker"), "./cmd/lethe-keybroker")
		cmd.Dir = ".."
		out, err = cmd.CombinedOutput()
	})
	if err != nil {
		t.Fatalf("building lethe-keybroker: %v\n%s", err, out)
	}
}
