package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestServerEndpoints(t *testing.T) {
	started := make(chan struct{})
	m := daemon.NewMetrics()
	s := daemon.NewServer(daemon.ServerConfig{
		Registry: m.Registry,
		Checks: []daemon.Check{
			daemon.Started("service", started),
			{Name: "vault", Func: func(context.Context) error { return nil }},
		},
		Logger: slog.New(slog.DiscardHandler),
	})
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()

	type answer struct {
		Code int
		Body string
	}
	check := func(path string, want answer) {
		t.Helper()
		code, body := get(t, srv.URL+path)
		if diff := cmp.Diff(want, answer{code, body}); diff != "" {
			t.Errorf("GET %s (-want +got):\n%s", path, diff)
		}
	}
	check("/healthz", answer{200, "ok\n"})
	check("/readyz", answer{503, "service: not started\n"})
	close(started)
	check("/readyz", answer{200, "ok\n"})

	m.NATSError("publish")
	code, body := get(t, srv.URL+"/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics: %d", code)
	}
	for _, want := range []string{
		`lethe_nats_errors_total{op="publish"} 1`,
		`go_goroutines `,
		`lethe_build_info{goversion="` + runtime.Version() + `",revision="`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

func TestReadyzFailingChecks(t *testing.T) {
	s := daemon.NewServer(daemon.ServerConfig{
		Checks: []daemon.Check{
			{Name: "vault", Func: func(context.Context) error { return errors.New("sealed") }},
			{Name: "nats", Func: func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }},
		},
		CheckTimeout: time.Millisecond,
		Logger:       slog.New(slog.DiscardHandler),
	})
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), http.MethodGet, "/readyz", nil))
	if diff := cmp.Diff("nats: context deadline exceeded\nvault: sealed\n", rec.Body.String()); diff != "" || rec.Code != 503 {
		t.Errorf("readyz: code %d, body (-want +got):\n%s", rec.Code, diff)
	}
}

func TestServeShutsDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := daemon.NewServer(daemon.ServerConfig{Logger: slog.New(slog.DiscardHandler)})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	if code, _ := get(t, "http://"+ln.Addr().String()+"/healthz"); code != 200 {
		t.Errorf("healthz: %d", code)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("listener still open after Serve returned")
	}
}

func TestRunWithoutListenWaits(t *testing.T) {
	s := daemon.NewServer(daemon.ServerConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := s.Run(ctx); err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestNewLogger(t *testing.T) {
	tests := map[string]struct {
		format, level string
		wantErr       bool
		want          string
	}{
		"json":        {format: "json", level: "info", want: `"msg":"Hello"`},
		"text":        {format: "text", level: "debug", want: "msg=Hello"},
		"bad format":  {format: "xml", level: "info", wantErr: true},
		"bad level":   {format: "text", level: "loud", wantErr: true},
		"level skips": {format: "text", level: "error", want: ""},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			log, err := daemon.NewLogger(&buf, tc.format, tc.level)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			log.Info("Hello")
			if tc.want == "" && buf.Len() > 0 || !strings.Contains(buf.String(), tc.want) {
				t.Errorf("log = %q, want it to contain %q", buf.String(), tc.want)
			}
		})
	}
}

func TestMetricsDocumented(t *testing.T) {
	m := daemon.NewMetrics()
	m.NATSError("async")
	daemontest.MetricsDocumented(t, m.Registry, 2)
}

func TestReadyzWarnings(t *testing.T) {
	const warning = "revocation: certificates are not checked against CRLs (--check-revocation=false)"
	for name, tc := range map[string]struct {
		check    func(context.Context) error
		wantCode int
		wantBody string
	}{
		"ready":     {check: func(context.Context) error { return nil }, wantCode: 200, wantBody: "ok\nwarning: " + warning + "\n"},
		"not ready": {check: func(context.Context) error { return errors.New("sealed") }, wantCode: 503, wantBody: "vault: sealed\nwarning: " + warning + "\n"},
	} {
		t.Run(name, func(t *testing.T) {
			s := daemon.NewServer(daemon.ServerConfig{
				Checks:   []daemon.Check{{Name: "vault", Func: tc.check}},
				Warnings: []string{warning},
				Logger:   slog.New(slog.DiscardHandler),
			})
			rec := httptest.NewRecorder()
			s.Handler().ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), http.MethodGet, "/readyz", nil))
			if diff := cmp.Diff(tc.wantBody, rec.Body.String()); diff != "" || rec.Code != tc.wantCode {
				t.Errorf("readyz: code %d (want %d), body (-want +got):\n%s", rec.Code, tc.wantCode, diff)
			}
		})
	}
}
