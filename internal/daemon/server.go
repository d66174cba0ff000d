package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Attribute keys of the package's logs.
const (
	attrComponent = "component"
	attrAddr      = "addr"
	attrCheck     = "check"
	attrError     = "error"
	attrOp        = "op"
	attrURL       = "url"
)

// Check is one readiness condition of a daemon.
type Check struct {
	// Name names the check in /readyz's answer ("nats", "vault", "service").
	Name string
	// Func returns nil when the condition holds. It must honour ctx (/readyz bounds it).
	Func func(ctx context.Context) error
}

// NATSConnected is the check that conn is connected to a NATS server.
func NATSConnected(conn *nats.Conn) Check {
	return Check{Name: "nats", Func: func(context.Context) error {
		if conn.IsConnected() {
			return nil
		}
		return fmt.Errorf("NATS connection is %s", strings.ToLower(conn.Status().String()))
	}}
}

// Started is the check named name that passes once ch is closed (a component's Ready or
// Started channel).
func Started(name string, ch <-chan struct{}) Check {
	return Check{Name: name, Func: func(context.Context) error {
		select {
		case <-ch:
			return nil
		default:
			return errors.New("not started")
		}
	}}
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// Listen is the host:port to serve on. Empty means no server: Run waits for its context
	// and returns nil.
	Listen string
	// Registry is gathered by /metrics. Nil means an empty registry.
	Registry *prometheus.Registry
	// Checks are the readiness checks of /readyz, run in parallel.
	Checks []Check
	// Warnings are settings an operator must see that do not make the daemon unready (a
	// security check turned off, say): /readyz lists each, as "warning: …", after its answer.
	Warnings []string
	// CheckTimeout bounds each readiness check. Zero means 2 s.
	CheckTimeout time.Duration
	// ShutdownTimeout bounds the graceful shutdown when Run's context ends. Zero means 5 s.
	ShutdownTimeout time.Duration
	// Logger receives the server's logs. Nil means slog.Default().
	Logger *slog.Logger
}

// Server serves a daemon's /metrics, /healthz and /readyz. Create it with NewServer.
type Server struct {
	cfg ServerConfig
	log *slog.Logger
	mux *http.ServeMux
}

// NewServer returns a Server for cfg. It does no I/O.
func NewServer(cfg ServerConfig) *Server {
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.CheckTimeout <= 0 {
		cfg.CheckTimeout = 2 * time.Second
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With(attrComponent, "http"), mux: http.NewServeMux()}
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}))
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	s.mux.HandleFunc("GET /readyz", s.readyz)
	return s
}

// Handler returns the server's handler (for tests and for mounting elsewhere).
func (s *Server) Handler() http.Handler { return s.mux }

// readyz answers 200 "ok" when every check passes, else 503 with one line per failing check;
// either way followed by one "warning: …" line per configured warning.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for _, c := range s.cfg.Checks {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(r.Context(), s.cfg.CheckTimeout)
			defer cancel()
			if err := c.Func(ctx); err != nil {
				mu.Lock()
				failed = append(failed, c.Name+": "+err.Error())
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if len(failed) > 0 {
		sort.Strings(failed)
		w.WriteHeader(http.StatusServiceUnavailable)
		for _, f := range failed {
			fmt.Fprintln(w, f)
		}
		s.writeWarnings(w)
		return
	}
	fmt.Fprintln(w, "ok")
	s.writeWarnings(w)
}

func (s *Server) writeWarnings(w http.ResponseWriter) {
	for _, warning := range s.cfg.Warnings {
		fmt.Fprintln(w, "warning: "+warning)
	}
}

// Run listens on cfg.Listen and serves until ctx ends, then shuts down gracefully. With no
// listen address it only waits for ctx. It returns an error if it cannot listen or serving
// fails, and nil when ctx ends.
func (s *Server) Run(ctx context.Context) error {
	if s.cfg.Listen == "" {
		<-ctx.Done()
		return nil
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening for metrics and health checks: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln until ctx ends, then shuts down gracefully and closes ln. It returns an
// error if serving fails, and nil when ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.log.Info("Serving metrics and health checks", attrAddr, ln.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("serving metrics and health checks: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serving metrics and health checks: %w", err)
	}
	return nil
}
