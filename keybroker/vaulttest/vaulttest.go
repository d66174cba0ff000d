// Package vaulttest starts a real Vault server in dev mode for tests: in memory, on a free
// loopback port, with a random root token, the Transit engine and a KV v2 mount enabled.
//
// The binary is $LETHE_VAULT, else bin/vault at the root of the module (`make vault` builds
// or links it). A test that needs Vault fails, never skips, when it cannot start one: CI must
// not pass without having talked to a real Vault.
//
// Proxy puts an HTTP proxy in front of the server that a test can cut, to see what happens
// when Vault becomes unreachable while the server (and its state) lives on. This package is
// for tests only and must never be linked into a production binary.
package vaulttest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/internal/syncbuf"
)

// KVMount is the KV v2 mount Start enables (the keybroker's default).
const KVMount = "lethe"

// TransitMount is the Transit mount Start enables (the keybroker's default).
const TransitMount = "transit"

// Server is a running Vault dev server.
type Server struct {
	// Addr is the server's address, http://127.0.0.1:PORT.
	Addr string
	// Token is the root token.
	Token string
	// Client is a client for Addr with the root token, no retries and a short timeout.
	Client *api.Client

	t    testing.TB
	bin  string
	port string

	mu   sync.Mutex
	cmd  *exec.Cmd
	out  *syncbuf.Buffer
	done chan struct{}
}

// Binary returns the path of the Vault binary the tests use, or an error saying how to get
// one.
func Binary() (string, error) {
	if p := os.Getenv("LETHE_VAULT"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("LETHE_VAULT=%s: %w", p, err)
		}
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, "bin", "vault")
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("no Vault binary at %s: run `make vault` at the repository root (or set LETHE_VAULT)", p)
			}
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory: cannot find bin/vault (set LETHE_VAULT)")
		}
		dir = parent
	}
}

// Start starts a Vault dev server and stops it when the test ends. It fails the test, with a
// message saying to run `make vault`, when it cannot.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatalf("vaulttest: cannot start Vault: %v\n(run `make vault` at the repository root to build or link bin/vault)", err)
	}
	tok := make([]byte, 16)
	rand.Read(tok)
	s := &Server{t: t, bin: bin, Token: "root-" + hex.EncodeToString(tok)}
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			t.Fatalf("vaulttest: finding a free port: %v", err)
		}
		s.port = port
		if lastErr = s.start(t.Context()); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("vaulttest: cannot start Vault (%s): %v\n(run `make vault` at the repository root to build or link bin/vault)", bin, lastErr)
	}
	t.Cleanup(s.Stop)
	return s
}

// start launches the server on s.port and enables the mounts.
func (s *Server) start(ctx context.Context) error {
	s.Addr = "http://127.0.0.1:" + s.port
	cmd := exec.Command(s.bin, "server", "-dev",
		"-dev-listen-address=127.0.0.1:"+s.port,
		"-dev-root-token-id="+s.Token,
		"-dev-no-store-token",
	)
	cmd.Env = append(os.Environ(), "VAULT_LOG_LEVEL=warn", "HOME="+os.TempDir())
	out := &syncbuf.Buffer{}
	pr, pw := io.Pipe()
	cmd.Stdout = io.MultiWriter(out, pw)
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", s.bin, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		pw.Close()
		close(done)
	}()
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		signaled := false
		for sc.Scan() {
			if !signaled && strings.Contains(sc.Text(), "Vault server started") {
				close(ready)
				signaled = true
			}
		}
		io.Copy(io.Discard, pr)
	}()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	select {
	case <-ready:
	case <-done:
		return fmt.Errorf("vault exited: %s", out.String())
	case <-ctx.Done():
		cmd.Process.Kill()
		<-done
		return fmt.Errorf("vault did not start within 60s: %s", out.String())
	}
	s.mu.Lock()
	s.cmd, s.out, s.done = cmd, out, done
	s.mu.Unlock()
	c, err := NewClient(s.Addr, s.Token)
	if err != nil {
		s.Stop()
		return err
	}
	s.Client = c
	if err := s.setUp(ctx); err != nil {
		s.Stop()
		return fmt.Errorf("%w: %s", err, out.String())
	}
	return nil
}

// setUp checks health and enables Transit and the KV v2 mount.
func (s *Server) setUp(ctx context.Context) error {
	h, err := s.Client.Sys().HealthWithContext(ctx)
	if err != nil {
		return fmt.Errorf("checking Vault's health: %w", err)
	}
	if !h.Initialized || h.Sealed {
		return fmt.Errorf("vault is not ready: initialized=%v sealed=%v", h.Initialized, h.Sealed)
	}
	if err := s.Client.Sys().MountWithContext(ctx, TransitMount, &api.MountInput{Type: "transit"}); err != nil {
		return fmt.Errorf("enabling transit: %w", err)
	}
	if err := s.Client.Sys().MountWithContext(ctx, KVMount, &api.MountInput{Type: "kv", Options: map[string]string{"version": "2"}}); err != nil {
		return fmt.Errorf("enabling kv v2: %w", err)
	}
	// A fresh KV v2 mount answers once its setup is done: wait for a write to succeed.
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		_, err := s.Client.KVv2(KVMount).Put(ctx, "vaulttest/ready", map[string]any{"ok": true})
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the kv v2 mount: %w", err)
		case <-t.C:
		}
	}
}

// Stop stops the server; its data is gone. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(os.Interrupt)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// Restart stops the server and starts a fresh one on the same address with the same token
// and mounts. Dev servers keep nothing: every key and record is gone.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	if err := s.start(s.t.Context()); err != nil {
		s.t.Fatalf("vaulttest: restarting Vault: %v", err)
	}
}

// Logs returns what the server printed.
func (s *Server) Logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.out == nil {
		return ""
	}
	return s.out.String()
}

// NewClient returns a Vault client for addr with token, without retries and with a short
// timeout, so that an unreachable Vault shows at once.
func NewClient(addr, token string) (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address = addr
	cfg.MaxRetries = 0
	cfg.Timeout = 10 * time.Second
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating Vault client: %w", err)
	}
	c.SetToken(token)
	return c, nil
}

// Proxy is an HTTP proxy in front of a Server that a test can cut.
type Proxy struct {
	// Addr is the proxy's address, http://127.0.0.1:PORT.
	Addr string

	mu    sync.Mutex
	block func(*http.Request) bool
}

// Proxy starts a proxy in front of s, closed when the test ends.
func (s *Server) Proxy(t testing.TB) *Proxy {
	t.Helper()
	target, err := url.Parse(s.Addr)
	if err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	p := &Proxy{}
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		block := p.block
		p.mu.Unlock()
		if block != nil && block(r) {
			// Drop the connection without an answer, as an unreachable Vault would.
			if hj, ok := w.(http.Hijacker); ok {
				if conn, _, err := hj.Hijack(); err == nil {
					conn.Close()
					return
				}
			}
			panic(http.ErrAbortHandler)
		}
		rp.ServeHTTP(w, r)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("vaulttest: starting proxy: %v", err)
	}
	p.Addr = "http://" + ln.Addr().String()
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return p
}

// ProxiedClient starts a proxy in front of s (see Proxy) and returns it with a client that
// reaches s through it with the root token, for tests that cut Vault off from their client.
func (s *Server) ProxiedClient(t testing.TB) (*Proxy, *api.Client) {
	t.Helper()
	p := s.Proxy(t)
	c, err := NewClient(p.Addr, s.Token)
	if err != nil {
		t.Fatal(err)
	}
	return p, c
}

// Cut makes Vault unreachable through the proxy: every request's connection is dropped.
func (p *Proxy) Cut() { p.Block(func(*http.Request) bool { return true }) }

// Restore lets every request through again.
func (p *Proxy) Restore() { p.Block(nil) }

// Block drops the connection of every request for which match returns true; nil lets all
// through.
func (p *Proxy) Block(match func(*http.Request) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.block = match
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	_, port, err := net.SplitHostPort(ln.Addr().String())
	return port, err
}
