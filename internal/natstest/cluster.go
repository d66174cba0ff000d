package natstest

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// clusterReadyTimeout bounds how long StartCluster waits for the cluster's JetStream to elect
// a meta leader.
const clusterReadyTimeout = 30 * time.Second

// Cluster is a cluster of in-process NATS servers with JetStream, routed to each other on
// loopback, so that streams and key-value buckets may have up to len(Nodes) replicas.
type Cluster struct {
	// Nodes are the cluster's servers, in the order of their names (n0, n1, ...). Stop and
	// Restart replace a node's Server.
	Nodes []*Server

	t testing.TB
}

// StartCluster starts n servers (n ≥ 1) with JetStream, clustered over routes on loopback, each
// with opts' configuration (as Start), and waits until JetStream has a meta leader. Every
// server is shut down when the test ends. It fails t if a server cannot start or the cluster
// does not form.
func StartCluster(t testing.TB, n int, opts Options) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("natstest: a cluster needs at least one server, not %d", n)
	}
	clientPorts, routePorts := freePorts(t, n), freePorts(t, n)
	routes := make([]*url.URL, n)
	for i, p := range routePorts {
		routes[i] = &url.URL{Scheme: "nats-route", Host: fmt.Sprintf("127.0.0.1:%d", p)}
	}
	c := &Cluster{t: t}
	for i := range n {
		o := &server.Options{}
		if opts.Config != "" {
			if err := o.ProcessConfigString(opts.Config); err != nil {
				t.Fatalf("natstest: parsing server config: %v", err)
			}
		}
		o.ServerName = fmt.Sprintf("n%d", i)
		o.Host = "127.0.0.1"
		o.Port = clientPorts[i]
		o.JetStream = true
		o.StoreDir = t.TempDir()
		o.NoSigs = true
		o.NoLog = true
		o.HTTPPort = 0
		o.LeafNode.Port = 0
		o.Cluster.Name = "lethe-test"
		o.Cluster.Host = "127.0.0.1"
		o.Cluster.Port = routePorts[i]
		o.Routes = routes
		c.Nodes = append(c.Nodes, &Server{URL: fmt.Sprintf("nats://127.0.0.1:%d", clientPorts[i]), t: t, opts: o})
	}
	// The servers start together: JetStream waits for its peers before it elects a leader.
	for _, s := range c.Nodes {
		ns, err := server.NewServer(s.opts.Clone())
		if err != nil {
			t.Fatalf("natstest: creating server %s: %v", s.opts.ServerName, err)
		}
		go ns.Start()
		s.Server = ns
	}
	t.Cleanup(func() {
		for _, s := range c.Nodes {
			if s.Server != nil {
				s.Server.Shutdown()
				s.Server.WaitForShutdown()
			}
		}
	})
	for _, s := range c.Nodes {
		if !s.Server.ReadyForConnections(readyTimeout) {
			t.Fatalf("natstest: server %s not ready for connections within %v", s.opts.ServerName, readyTimeout)
		}
	}
	c.WaitForLeader()
	return c
}

// freePorts returns n distinct loopback ports free when it looked.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	for i := range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("natstest: finding a free port: %v", err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		defer l.Close()
	}
	return ports
}

// URLs returns the client URLs of every node, comma-separated, as nats.Connect takes them.
func (c *Cluster) URLs() string {
	urls := make([]string, len(c.Nodes))
	for i, s := range c.Nodes {
		urls[i] = s.URL
	}
	return strings.Join(urls, ",")
}

// Connect connects to the cluster (any node) and closes the connection at the end of the
// test. It fails t if the connection cannot be made.
func (c *Cluster) Connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(c.URLs(), opts...)
	if err != nil {
		t.Fatalf("natstest: connecting to %s: %v", c.URLs(), err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Stop shuts node i down; its store directory and ports are kept for Restart. It must not be
// called concurrently with Restart of the same node.
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	s := c.Nodes[i]
	if s.Server == nil {
		return
	}
	s.Server.Shutdown()
	s.Server.WaitForShutdown()
	s.Server = nil
}

// Restart starts node i again, stopped or not, with the same configuration, ports and store
// directory. It fails the test if the node does not accept connections.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	c.Stop(i)
	c.Nodes[i].start()
}

// WaitForLeader waits until a running node sees a JetStream meta leader, and fails the test
// if none is elected within a bound.
func (c *Cluster) WaitForLeader() {
	c.t.Helper()
	deadline := time.Now().Add(clusterReadyTimeout)
	for time.Now().Before(deadline) {
		for _, s := range c.Nodes {
			if s.Server != nil && s.Server.JetStreamIsLeader() {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("natstest: no JetStream meta leader within %v", clusterReadyTimeout)
}
