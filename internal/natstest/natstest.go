// Package natstest starts a real, in-process NATS server with JetStream for tests.
//
// Each server listens on a random loopback port, keeps its JetStream store in the test's
// temporary directory and is shut down when the test ends. A server that cannot start fails
// the test with a message saying why; it never skips. This package is for tests only and must
// never be linked into a production binary.
package natstest

import (
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// readyTimeout bounds how long Start waits for the server to accept connections.
const readyTimeout = 10 * time.Second

// Options configures a test server. The zero value is a server without authentication.
type Options struct {
	// Config is nats-server configuration text (accounts, users, permissions), as written by
	// natsauth.WriteServerConfig. Empty: no authentication. Its listen address and JetStream
	// store directory are overridden.
	Config string
}

// Server is a running in-process NATS server.
type Server struct {
	// URL is the client URL of the server, nats://127.0.0.1:PORT.
	URL string
	// Server is the underlying nats-server; Restart replaces it.
	Server *server.Server

	t    testing.TB
	opts *server.Options
}

// Start starts a NATS server with JetStream and registers its shutdown with t.Cleanup.
// It fails t if the configuration is invalid or the server does not become ready.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	o := &server.Options{}
	if opts.Config != "" {
		if err := o.ProcessConfigString(opts.Config); err != nil {
			t.Fatalf("natstest: parsing server config: %v", err)
		}
	}
	o.Host = "127.0.0.1"
	o.Port = server.RANDOM_PORT
	o.JetStream = true
	o.StoreDir = t.TempDir()
	o.NoSigs = true
	o.NoLog = true
	o.HTTPPort = 0
	o.Cluster.Port = 0
	o.LeafNode.Port = 0
	srv := &Server{t: t, opts: o}
	srv.start()
	t.Cleanup(func() {
		srv.Server.Shutdown()
		srv.Server.WaitForShutdown()
	})
	srv.URL = srv.Server.ClientURL()
	// A restart must come back on the same port, so that clients reconnect to it.
	srv.opts.Port = srv.Server.Addr().(*net.TCPAddr).Port
	return srv
}

// start creates and starts a server from s.opts and waits until it accepts connections.
func (s *Server) start() {
	s.t.Helper()
	ns, err := server.NewServer(s.opts.Clone())
	if err != nil {
		s.t.Fatalf("natstest: creating server: %v", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(readyTimeout) {
		ns.Shutdown()
		s.t.Fatalf("natstest: server not ready for connections within %v", readyTimeout)
	}
	s.Server = ns
}

// Restart shuts the server down and starts it again on the same port with the same
// configuration and JetStream store directory, so that streams and key-value buckets survive
// and clients that reconnect find them. It fails the test if the server does not come back.
// It must not be called concurrently with itself.
func (s *Server) Restart() {
	s.t.Helper()
	s.Server.Shutdown()
	s.Server.WaitForShutdown()
	s.start()
}

// Connect connects to the server and closes the connection at the end of the test. It fails t
// if the connection cannot be made.
func (s *Server) Connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.URL, opts...)
	if err != nil {
		t.Fatalf("natstest: connecting to %s: %v", s.URL, err)
	}
	t.Cleanup(nc.Close)
	return nc
}
