package clustertest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/internal/natsauth"
)

// natsModule is the module whose main package is nats-server.
const natsModule = "github.com/nats-io/nats-server/v2"

// startLimit bounds the wait for a cluster, or one node of it, to be ready.
const startLimit = 60 * time.Second

// NATSOptions configures a NATS cluster.
type NATSOptions struct {
	// Users are the users of every node, with their permissions, as natsauth writes them. Empty
	// means no authentication.
	Users []natsauth.User
}

// NATS is a running cluster of three nats-server processes with JetStream. The routes
// between every two nodes go through loopback proxies, so that Partition can cut a node off
// from the others while it keeps serving its clients.
type NATS struct {
	// URL is every node's client URL, comma-separated, as NATS clients take it.
	URL string

	t     testing.TB
	bin   string
	dir   string
	nodes []*natsNode
	// routes[i][j] carries node i's route to node j.
	routes [][]*proxy
}

type natsNode struct {
	name   string
	client int
	http   int
	route  int
	config string

	mu   sync.Mutex
	proc *process
}

// NATSBinary returns the path of a nats-server built from the version of the module the
// project requires, building it into the per-user cache the first time.
func NATSBinary() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out, err := goCmd(root, "list", "-m", "-f", "{{.Version}}", natsModule)
	if err != nil {
		return "", fmt.Errorf("finding the version of %s: %w", natsModule, err)
	}
	version := strings.TrimSpace(out)
	return cached("nats-server", version, func(path string) error {
		if out, err := goCmd(root, "build", "-o", path, natsModule); err != nil {
			return fmt.Errorf("building nats-server %s: %w\n%s", version, err, out)
		}
		return nil
	})
}

// cached returns the path of the binary name-version in the per-user cache,
// ${XDG_CACHE_HOME:-$HOME/.cache}/lethe, calling build to write it at the path it is given the
// first time. What build writes is renamed into place once build returns, so that an
// interrupted build never leaves a broken binary behind.
func cached(name, version string, build func(path string) error) (string, error) {
	cache, err := os.UserCacheDir()
	if xdg := os.Getenv("XDG_CACHE_HOME"); xdg != "" {
		cache, err = xdg, nil
	}
	if err != nil {
		return "", fmt.Errorf("finding the cache directory: %w", err)
	}
	dir := filepath.Join(cache, "lethe")
	bin := filepath.Join(dir, name+"-"+version)
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(dir, name+"-"+version+".*.tmp")
	if err != nil {
		return "", err
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	if err := build(tmp.Name()); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), bin); err != nil {
		return "", err
	}
	return bin, nil
}

// StartNATS starts a three-node cluster and stops it when the test ends. It returns once
// every node is healthy and the cluster has a JetStream meta leader, and fails t if that does
// not happen within a minute.
func StartNATS(t testing.TB, opts NATSOptions) *NATS {
	t.Helper()
	bin, err := NATSBinary()
	if err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	c := &NATS{t: t, bin: bin, dir: t.TempDir()}
	ports, err := freePorts(9)
	if err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	var urls []string
	for i := range 3 {
		n := &natsNode{name: fmt.Sprintf("n%d", i+1), client: ports[3*i], http: ports[3*i+1], route: ports[3*i+2]}
		c.nodes = append(c.nodes, n)
		urls = append(urls, "nats://"+hostPort(n.client))
	}
	c.URL = strings.Join(urls, ",")
	c.routes = make([][]*proxy, 3)
	for i := range 3 {
		c.routes[i] = make([]*proxy, 3)
		for j := range 3 {
			if i == j {
				continue
			}
			target := hostPort(c.nodes[j].route)
			p, err := newProxy(func() string { return target })
			if err != nil {
				t.Fatalf("clustertest: %v", err)
			}
			t.Cleanup(p.close)
			c.routes[i][j] = p
		}
	}
	for i, n := range c.nodes {
		if n.config, err = c.writeConfig(i, opts); err != nil {
			t.Fatalf("clustertest: %v", err)
		}
	}
	t.Cleanup(c.stop)
	for i := range c.nodes {
		c.startNode(i)
	}
	for i := range c.nodes {
		c.waitHealthy(i)
	}
	ctx, cancel := context.WithTimeout(t.Context(), startLimit)
	defer cancel()
	if _, err := waitFor(ctx, c.metaLeader); err != nil {
		t.Fatalf("clustertest: no JetStream meta leader: %v", err)
	}
	return c
}

// writeConfig writes node i's configuration: natsauth's, with the node's name, monitoring
// port and cluster block appended.
func (c *NATS) writeConfig(i int, opts NATSOptions) (string, error) {
	n := c.nodes[i]
	var b strings.Builder
	err := natsauth.WriteServerConfig(&b, natsauth.ServerConfig{
		Listen: hostPort(n.client), StoreDir: filepath.Join(c.dir, n.name), Users: opts.Users, Dev: len(opts.Users) == 0,
	})
	if err != nil {
		return "", err
	}
	fmt.Fprintf(&b, "server_name: %s\nhttp: %q\n", n.name, hostPort(n.http))
	fmt.Fprintf(&b, "cluster {\n  name: lethe\n  listen: %q\n  routes: [\n", hostPort(n.route))
	for j := range c.nodes {
		if j != i {
			fmt.Fprintf(&b, "    %q\n", "nats-route://"+c.routes[i][j].Addr())
		}
	}
	b.WriteString("  ]\n}\n")
	path := filepath.Join(c.dir, n.name+".conf")
	return path, os.WriteFile(path, []byte(b.String()), 0o600)
}

func (c *NATS) startNode(i int) {
	c.t.Helper()
	n := c.nodes[i]
	p, err := startProcess(nil, c.bin, "-c", n.config)
	if err != nil {
		c.t.Fatalf("clustertest: starting nats-server %s: %v", n.name, err)
	}
	n.mu.Lock()
	n.proc = p
	n.mu.Unlock()
}

// waitHealthy waits until node i answers its health check (JetStream current).
func (c *NATS) waitHealthy(i int) {
	c.t.Helper()
	n := c.nodes[i]
	ctx, cancel := context.WithTimeout(c.t.Context(), startLimit)
	defer cancel()
	_, err := waitFor(ctx, func(ctx context.Context) (struct{}, error) {
		n.mu.Lock()
		p := n.proc
		n.mu.Unlock()
		if !p.running() {
			return struct{}{}, fmt.Errorf("exited: %s", p.tail())
		}
		return struct{}{}, getJSON(ctx, fmt.Sprintf("http://%s/healthz", hostPort(n.http)), nil)
	})
	if err != nil {
		c.t.Fatalf("clustertest: nats-server %s not healthy: %v", n.name, err)
	}
}

func (c *NATS) stop() {
	for _, n := range c.nodes {
		n.mu.Lock()
		p := n.proc
		n.mu.Unlock()
		p.stop()
	}
}

// NodeURL is node i's client URL.
func (c *NATS) NodeURL(i int) string { return "nats://" + hostPort(c.nodes[i].client) }

// Name is node i's server name, as MetaLeader and StreamLeader report it.
func (c *NATS) Name(i int) string { return c.nodes[i].name }

// Kill kills node i (SIGKILL), as a crash would.
func (c *NATS) Kill(i int) {
	n := c.nodes[i]
	n.mu.Lock()
	p := n.proc
	n.mu.Unlock()
	p.kill()
}

// Restart starts node i again, after Kill, on the same ports and store, and waits until it is
// healthy (caught up with the cluster).
func (c *NATS) Restart(i int) {
	c.t.Helper()
	c.Kill(i)
	c.startNode(i)
	c.waitHealthy(i)
}

// Partition cuts node i's routes to and from every other node; its clients stay connected to
// it. Heal restores them.
func (c *NATS) Partition(i int) { c.setPartition(i, true) }

// Heal restores node i's routes after Partition.
func (c *NATS) Heal(i int) { c.setPartition(i, false) }

func (c *NATS) setPartition(i int, cut bool) {
	for j := range c.nodes {
		if j != i {
			c.routes[i][j].setCut(cut)
			c.routes[j][i].setCut(cut)
		}
	}
}

// Index returns the index of the node named name, or -1.
func (c *NATS) Index(name string) int {
	for i, n := range c.nodes {
		if n.name == name {
			return i
		}
	}
	return -1
}

// MetaLeader returns the index of the JetStream meta leader, waiting up to a minute for the
// cluster to have one; it fails the test when it does not.
func (c *NATS) MetaLeader() int {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.t.Context(), startLimit)
	defer cancel()
	name, err := waitFor(ctx, c.metaLeader)
	if err != nil {
		c.t.Fatalf("clustertest: no JetStream meta leader: %v", err)
	}
	return c.Index(name)
}

// StreamLeader returns the index of the leader of stream (a key-value bucket B is stream
// KV_B), waiting up to a minute for it to have one; it fails the test when it does not.
func (c *NATS) StreamLeader(stream string) int {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.t.Context(), startLimit)
	defer cancel()
	name, err := waitFor(ctx, func(ctx context.Context) (string, error) { return c.streamLeader(ctx, stream) })
	if err != nil {
		c.t.Fatalf("clustertest: stream %s has no leader: %v", stream, err)
	}
	return c.Index(name)
}

// StreamLeaderWithout returns the index of the leader of stream that the nodes other than
// node i agree on, a node other than i, waiting up to a minute; it fails the test when there
// is none. With node i partitioned, it is the leader the majority elected.
func (c *NATS) StreamLeaderWithout(stream string, i int) int {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.t.Context(), startLimit)
	defer cancel()
	name, err := waitFor(ctx, func(ctx context.Context) (string, error) {
		name, err := c.agreedWithout(ctx, i, "/jsz?accounts=true&streams=true", streamLeaderOf(stream))
		if err == nil && name == c.nodes[i].name {
			return "", fmt.Errorf("the nodes other than %s still name it the leader of %s", name, stream)
		}
		return name, err
	})
	if err != nil {
		c.t.Fatalf("clustertest: stream %s has no leader without %s: %v", stream, c.nodes[i].name, err)
	}
	return c.Index(name)
}

// jsz is the part of a node's /jsz answer the leaders are read from.
type jsz struct {
	Meta *struct {
		Leader string `json:"leader"`
	} `json:"meta_cluster"`
	Accounts []struct {
		Streams []struct {
			Name    string `json:"name"`
			Cluster *struct {
				Leader   string `json:"leader"`
				Replicas []struct {
					Name    string `json:"name"`
					Current bool   `json:"current"`
				} `json:"replicas"`
			} `json:"cluster"`
		} `json:"stream_detail"`
	} `json:"account_details"`
}

// metaLeader asks the running nodes who leads the meta group; only an answer every running
// node that answers agrees on counts, so that a partitioned node's stale view is not taken.
func (c *NATS) metaLeader(ctx context.Context) (string, error) {
	return c.agreed(ctx, "/jsz", func(z *jsz) string {
		if z.Meta == nil {
			return ""
		}
		return z.Meta.Leader
	})
}

func (c *NATS) streamLeader(ctx context.Context, stream string) (string, error) {
	return c.agreed(ctx, "/jsz?accounts=true&streams=true", streamLeaderOf(stream))
}

// streamLeaderOf reads the leader of stream from a /jsz answer.
func streamLeaderOf(stream string) func(*jsz) string {
	return func(z *jsz) string {
		for _, a := range z.Accounts {
			for _, s := range a.Streams {
				if s.Name == stream && s.Cluster != nil {
					return s.Cluster.Leader
				}
			}
		}
		return ""
	}
}

func (c *NATS) running(i int) bool {
	n := c.nodes[i]
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc.running()
}

// agreed reads path on every running node and returns the leader they all name, a node that
// runs.
func (c *NATS) agreed(ctx context.Context, path string, leader func(*jsz) string) (string, error) {
	return c.agreedWithout(ctx, -1, path, leader)
}

// agreedWithout is agreed, not asking node skip.
func (c *NATS) agreedWithout(ctx context.Context, skip int, path string, leader func(*jsz) string) (string, error) {
	var got string
	for j, n := range c.nodes {
		if j == skip {
			continue
		}
		n.mu.Lock()
		p := n.proc
		n.mu.Unlock()
		if !p.running() {
			continue
		}
		var z jsz
		if err := getJSON(ctx, fmt.Sprintf("http://%s%s", hostPort(n.http), path), &z); err != nil {
			return "", fmt.Errorf("%s: %w", n.name, err)
		}
		l := leader(&z)
		switch {
		case l == "":
			return "", fmt.Errorf("%s knows no leader", n.name)
		case got != "" && l != got:
			return "", fmt.Errorf("nodes disagree on the leader: %s, %s", got, l)
		}
		got = l
	}
	if got == "" {
		return "", errors.New("no node running")
	}
	if i := c.Index(got); i < 0 || !c.running(i) {
		return "", fmt.Errorf("the leader named, %s, does not run", got)
	}
	return got, nil
}

// getJSON GETs url and decodes its JSON answer into v (unless nil); a status other than 200
// is an error.
func getJSON(ctx context.Context, url string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if v == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// waitFor calls f every 50 ms until it succeeds, and returns its last error when ctx ends.
func waitFor[T any](ctx context.Context, f func(context.Context) (T, error)) (T, error) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		v, err := f(ctx)
		if err == nil {
			return v, nil
		}
		// The try that ctx's end cut short says less than the one before it.
		if ctx.Err() == nil || last == nil {
			last = err
		}
		select {
		case <-ctx.Done():
			return v, fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// moduleRoot is the directory of the go.mod above the working directory.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

func goCmd(dir string, args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Logs returns the end of what node i printed, for failure messages.
func (c *NATS) Logs(i int) string {
	n := c.nodes[i]
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc.tail()
}

// Running reports whether node i's process runs.
func (c *NATS) Running(i int) bool { return c.running(i) }

// Restore undoes the faults a test made: it heals every partition, starts every node that
// does not run, and waits until the cluster is healthy (see WaitHealthy).
func (c *NATS) Restore() {
	c.t.Helper()
	for i := range c.nodes {
		c.Heal(i)
	}
	for i := range c.nodes {
		if !c.running(i) {
			c.startNode(i)
		}
	}
	c.WaitHealthy()
}

// WaitHealthy waits until every node runs and answers its health check, the nodes agree on a
// meta leader, and every stream has a leader and every replica current; it fails the test if
// that does not happen within a minute.
func (c *NATS) WaitHealthy() {
	c.t.Helper()
	for i := range c.nodes {
		c.waitHealthy(i)
	}
	ctx, cancel := context.WithTimeout(c.t.Context(), startLimit)
	defer cancel()
	if _, err := waitFor(ctx, c.healthy); err != nil {
		c.t.Fatalf("clustertest: NATS cluster not healthy: %v", err)
	}
}

// healthy checks the meta leader, and each stream's leader on every node and its replicas on
// its leader.
func (c *NATS) healthy(ctx context.Context) (struct{}, error) {
	if _, err := c.metaLeader(ctx); err != nil {
		return struct{}{}, err
	}
	// led is every stream seen by its leader; seen, every stream.
	led, seen := map[string]bool{}, map[string]bool{}
	for _, n := range c.nodes {
		var z jsz
		if err := getJSON(ctx, fmt.Sprintf("http://%s/jsz?accounts=true&streams=true", hostPort(n.http)), &z); err != nil {
			return struct{}{}, fmt.Errorf("%s: %w", n.name, err)
		}
		for _, a := range z.Accounts {
			for _, s := range a.Streams {
				if s.Cluster == nil {
					continue
				}
				seen[s.Name] = true
				if s.Cluster.Leader == "" {
					return struct{}{}, fmt.Errorf("%s: stream %s has no leader", n.name, s.Name)
				}
				// Only the leader tracks its followers: another node's view of them is stale.
				if s.Cluster.Leader != n.name {
					continue
				}
				led[s.Name] = true
				for _, r := range s.Cluster.Replicas {
					if !r.Current {
						return struct{}{}, fmt.Errorf("%s: stream %s's replica on %s is not current", n.name, s.Name, r.Name)
					}
				}
			}
		}
	}
	for name := range seen {
		if !led[name] {
			return struct{}{}, fmt.Errorf("stream %s: its leader does not report it", name)
		}
	}
	return struct{}{}, nil
}
