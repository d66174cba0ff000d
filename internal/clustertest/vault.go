package clustertest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// VaultHA is a running Vault cluster of three servers with integrated Raft storage,
// initialised with a single unseal key, unsealed, with the Transit and KV v2 mounts the
// keybroker uses (vaulttest.TransitMount, vaulttest.KVMount).
type VaultHA struct {
	// Addr is the address of a loopback proxy in front of the cluster, http://127.0.0.1:PORT,
	// for clients that take one address: it forwards each connection to a node that runs (a
	// standby forwards requests to the active node).
	Addr string
	// Token is the root token.
	Token string

	t         testing.TB
	bin       string
	dir       string
	unsealKey string
	front     *proxy
	nodes     []*vaultNode
}

type vaultNode struct {
	api     int
	cluster int
	config  string

	mu   sync.Mutex
	proc *process
}

// StartVaultHA starts a three-node Vault cluster and stops it when the test ends: node 0 is
// initialised and unsealed, nodes 1 and 2 join it. It returns once the mounts accept writes,
// and fails t if that does not happen within a minute.
func StartVaultHA(t testing.TB) *VaultHA {
	t.Helper()
	bin, err := vaulttest.Binary()
	if err != nil {
		t.Fatalf("clustertest: cannot start Vault: %v\n(run `make vault` at the repository root to build or link bin/vault)", err)
	}
	v := &VaultHA{t: t, bin: bin, dir: t.TempDir()}
	ports, err := freePorts(6)
	if err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	for i := range 3 {
		v.nodes = append(v.nodes, &vaultNode{api: ports[2*i], cluster: ports[2*i+1]})
	}
	for i := range v.nodes {
		if err := v.writeConfig(i); err != nil {
			t.Fatalf("clustertest: %v", err)
		}
	}
	v.front, err = newProxy(v.liveNode)
	if err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	t.Cleanup(v.front.close)
	v.Addr = "http://" + v.front.Addr()
	t.Cleanup(v.stop)
	for i := range v.nodes {
		v.startNode(i)
	}

	ctx, cancel := context.WithTimeout(t.Context(), startLimit)
	defer cancel()
	c0 := v.client(0, "")
	init, err := waitFor(ctx, func(ctx context.Context) (*api.InitResponse, error) {
		return c0.Sys().InitWithContext(ctx, &api.InitRequest{SecretShares: 1, SecretThreshold: 1})
	})
	if err != nil {
		t.Fatalf("clustertest: initialising Vault: %v\n%s", err, v.tail(0))
	}
	v.Token, v.unsealKey = init.RootToken, init.KeysB64[0]
	for i := range v.nodes {
		v.unseal(ctx, i)
		if i == 0 {
			if _, err := waitFor(ctx, func(ctx context.Context) (int, error) { return v.leader(ctx) }); err != nil {
				t.Fatalf("clustertest: Vault elected no leader: %v\n%s", err, v.tail(0))
			}
			// Autopilot makes a joining node a voter once it has been healthy this long
			// (10 s by default): until then, killing the leader would lose the quorum.
			if _, err := waitFor(ctx, func(ctx context.Context) (*api.Secret, error) {
				return v.Client().Logical().WriteWithContext(ctx, "sys/storage/raft/autopilot/configuration", map[string]any{
					"server_stabilization_time": "1s", "cleanup_dead_servers": false,
				})
			}); err != nil {
				t.Fatalf("clustertest: configuring autopilot: %v", err)
			}
		}
	}
	if _, err := waitFor(ctx, v.voters); err != nil {
		t.Fatalf("clustertest: Vault nodes did not all become voters: %v", err)
	}
	c := v.Client()
	for path, in := range map[string]*api.MountInput{
		vaulttest.TransitMount: {Type: "transit"},
		vaulttest.KVMount:      {Type: "kv", Options: map[string]string{"version": "2"}},
	} {
		if _, err := waitFor(ctx, func(ctx context.Context) (struct{}, error) {
			return struct{}{}, c.Sys().MountWithContext(ctx, path, in)
		}); err != nil {
			t.Fatalf("clustertest: enabling %s: %v", path, err)
		}
	}
	// A fresh KV v2 mount answers once its setup is done: wait for a write to succeed.
	if _, err := waitFor(ctx, func(ctx context.Context) (*api.KVSecret, error) {
		return c.KVv2(vaulttest.KVMount).Put(ctx, "clustertest/ready", map[string]any{"ok": true})
	}); err != nil {
		t.Fatalf("clustertest: waiting for the kv v2 mount: %v", err)
	}
	return v
}

// writeConfig writes node i's configuration: Raft storage that joins every other node,
// loopback listeners without TLS, a short Raft timing for quick elections.
func (v *VaultHA) writeConfig(i int) error {
	n := v.nodes[i]
	data := filepath.Join(v.dir, fmt.Sprintf("node%d", i))
	if err := os.MkdirAll(data, 0o700); err != nil {
		return err
	}
	var joins strings.Builder
	for j, o := range v.nodes {
		if j != i {
			fmt.Fprintf(&joins, "  retry_join {\n    leader_api_addr = %q\n  }\n", "http://"+hostPort(o.api))
		}
	}
	cfg := fmt.Sprintf(`storage "raft" {
  path = %q
  node_id = "vault%d"
  performance_multiplier = 1
%s}
listener "tcp" {
  address = %q
  cluster_address = %q
  tls_disable = true
}
api_addr = %q
cluster_addr = %q
disable_mlock = true
`, data, i, joins.String(), hostPort(n.api), hostPort(n.cluster), "http://"+hostPort(n.api), "https://"+hostPort(n.cluster))
	n.config = filepath.Join(v.dir, fmt.Sprintf("vault%d.hcl", i))
	return os.WriteFile(n.config, []byte(cfg), 0o600)
}

func (v *VaultHA) startNode(i int) {
	v.t.Helper()
	n := v.nodes[i]
	p, err := startProcess([]string{"VAULT_LOG_LEVEL=warn", "HOME=" + os.TempDir()}, v.bin, "server", "-config", n.config)
	if err != nil {
		v.t.Fatalf("clustertest: starting Vault node %d: %v", i, err)
	}
	n.mu.Lock()
	n.proc = p
	n.mu.Unlock()
}

// unseal unseals node i with the key, again until it reports itself unsealed (a joining node
// takes the key only once its join has begun).
func (v *VaultHA) unseal(ctx context.Context, i int) {
	v.t.Helper()
	c := v.client(i, "")
	if _, err := waitFor(ctx, func(ctx context.Context) (struct{}, error) {
		if !v.running(i) {
			return struct{}{}, fmt.Errorf("exited: %s", v.tail(i))
		}
		st, err := c.Sys().UnsealWithContext(ctx, v.unsealKey)
		if err != nil {
			return struct{}{}, err
		}
		if st.Sealed {
			return struct{}{}, fmt.Errorf("still sealed")
		}
		return struct{}{}, nil
	}); err != nil {
		v.t.Fatalf("clustertest: unsealing Vault node %d: %v\n%s", i, err, v.tail(i))
	}
}

// leaderSeenBy returns the index of the leader node i names, -1 if it names none, -2 if it is
// sealed.
func (v *VaultHA) leaderSeenBy(ctx context.Context, i int) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c := v.client(i, "")
	st, err := c.Sys().SealStatusWithContext(ctx)
	if err != nil {
		return -1, err
	}
	if st.Sealed {
		return -2, nil
	}
	l, err := c.Sys().LeaderWithContext(ctx)
	if err != nil {
		return -1, err
	}
	for j := range v.nodes {
		if l.LeaderAddress == v.NodeAddr(j) {
			return j, nil
		}
	}
	return -1, nil
}

// voters succeeds once the Raft configuration has every node as a voter.
func (v *VaultHA) voters(ctx context.Context) (struct{}, error) {
	s, err := v.Client().Logical().ReadWithContext(ctx, "sys/storage/raft/configuration")
	if err != nil {
		return struct{}{}, err
	}
	if s == nil {
		return struct{}{}, fmt.Errorf("no raft configuration")
	}
	cfg, _ := s.Data["config"].(map[string]any)
	servers, _ := cfg["servers"].([]any)
	n := 0
	for _, sv := range servers {
		if m, _ := sv.(map[string]any); m["voter"] == true {
			n++
		}
	}
	if n != len(v.nodes) {
		return struct{}{}, fmt.Errorf("%d voters of %d nodes", n, len(v.nodes))
	}
	return struct{}{}, nil
}

func (v *VaultHA) stop() {
	for _, n := range v.nodes {
		n.mu.Lock()
		p := n.proc
		n.mu.Unlock()
		p.stop()
	}
}

func (v *VaultHA) running(i int) bool {
	n := v.nodes[i]
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc.running()
}

func (v *VaultHA) tail(i int) string {
	n := v.nodes[i]
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc.tail()
}

// liveNode is the address the front proxy forwards to: the first node that runs.
func (v *VaultHA) liveNode() string {
	for i, n := range v.nodes {
		if v.running(i) {
			return hostPort(n.api)
		}
	}
	return hostPort(v.nodes[0].api)
}

// NodeAddr is node i's own address, http://127.0.0.1:PORT.
func (v *VaultHA) NodeAddr(i int) string { return "http://" + hostPort(v.nodes[i].api) }

// Client returns a client of the cluster (through Addr) with the root token.
func (v *VaultHA) Client() *api.Client {
	v.t.Helper()
	c, err := vaulttest.NewClient(v.Addr, v.Token)
	if err != nil {
		v.t.Fatal(err)
	}
	return c
}

// client returns a client of node i with token.
func (v *VaultHA) client(i int, token string) *api.Client {
	v.t.Helper()
	c, err := vaulttest.NewClient(v.NodeAddr(i), token)
	if err != nil {
		v.t.Fatal(err)
	}
	return c
}

// Kill kills node i (SIGKILL), as a crash would.
func (v *VaultHA) Kill(i int) {
	n := v.nodes[i]
	n.mu.Lock()
	p := n.proc
	n.mu.Unlock()
	p.kill()
}

// Restart starts node i again, after Kill, with its Raft data, unseals it and waits until the
// cluster has a leader.
func (v *VaultHA) Restart(i int) {
	v.t.Helper()
	v.Kill(i)
	v.startNode(i)
	ctx, cancel := context.WithTimeout(v.t.Context(), startLimit)
	defer cancel()
	v.unseal(ctx, i)
	v.Leader()
}

// Leader returns the index of the active node, waiting up to a minute for the cluster to
// have one; it fails the test when it does not.
func (v *VaultHA) Leader() int {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(v.t.Context(), startLimit)
	defer cancel()
	i, err := waitFor(ctx, v.leader)
	if err != nil {
		v.t.Fatalf("clustertest: Vault has no leader: %v", err)
	}
	return i
}

// leader asks the running, unsealed nodes which is active; those that answer within two
// seconds must agree, on a node that runs.
func (v *VaultHA) leader(ctx context.Context) (int, error) {
	got := -1
	var errs []error
	for i := range v.nodes {
		if !v.running(i) {
			continue
		}
		at, err := v.leaderSeenBy(ctx, i)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("node %d: %w", i, err))
			continue
		case at == -2:
			continue // sealed
		case at < 0:
			return -1, fmt.Errorf("node %d knows no leader", i)
		case got >= 0 && at != got:
			return -1, fmt.Errorf("nodes disagree on the leader: %d, %d", got, at)
		}
		got = at
	}
	if got < 0 && len(errs) > 0 {
		return -1, errors.Join(errs...)
	}
	if got < 0 {
		return -1, fmt.Errorf("no node unsealed")
	}
	if !v.running(got) {
		return -1, fmt.Errorf("the leader named, node %d, does not run", got)
	}
	return got, nil
}

// Restore starts every node that does not run, unseals it, and waits until the cluster has a
// leader.
func (v *VaultHA) Restore() {
	v.t.Helper()
	for i := range v.nodes {
		if !v.running(i) {
			v.Restart(i)
		}
	}
	v.Leader()
}
