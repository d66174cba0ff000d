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
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/daemon"
	"github.com/lethe-cc/lethe/keybroker"
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
	bm := m.Broker()
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

	bm.PhaseChanged(broker.PhaseCommitted, broker.PhaseErased, 2*time.Second)
	bm.Handshake(150 * time.Millisecond)
	bm.Unfinished(map[broker.Phase]int{broker.PhaseTransferring: 3})
	bm.NATSError("publish")
	code, body := get(t, srv.URL+"/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics: %d", code)
	}
	for _, want := range []string{
		`lethe_broker_phase_transitions_total{from="Committed",to="Erased"} 1`,
		`lethe_broker_migrations_finished_total{outcome="erased"} 1`,
		`lethe_broker_migrations_finished_total{outcome="aborted"} 0`,
		`lethe_broker_migrations{phase="Transferring"} 3`,
		`lethe_broker_migrations{phase="Attesting"} 0`,
		`lethe_broker_phase_duration_seconds_count{phase="Committed"} 1`,
		`lethe_broker_handshake_duration_seconds_count 1`,
		`lethe_nats_errors_total{op="publish"} 1`,
		`go_goroutines `,
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

func TestKeybrokerAndAgentMetrics(t *testing.T) {
	m := daemon.NewMetrics()
	k := m.Keybroker()
	k.SetBacklog(func() int { return 2 })
	k.Decided(keybroker.EventRelease, keybroker.DecisionDeny, "denied")
	k.Decided(keybroker.EventRelease, keybroker.DecisionAllow, "")
	k.Released(keybroker.DecisionAllow, 20*time.Millisecond)
	k.VaultError()
	a := m.Agent()
	a.BytesSent(4096)
	a.MigrationEnded(attest.RoleSource, "committed")
	a.LibvirtError("migrate")

	want := `
# HELP lethe_keybroker_decisions_total Audit events by kind (release, adopt, reissue, destroy), decision (allow, deny, error) and reason (the error code of a denial or error; empty for allow).
# TYPE lethe_keybroker_decisions_total counter
lethe_keybroker_decisions_total{decision="allow",kind="release",reason=""} 1
lethe_keybroker_decisions_total{decision="deny",kind="release",reason="denied"} 1
# HELP lethe_keybroker_destruction_backlog Key destructions journaled and waiting for Vault.
# TYPE lethe_keybroker_destruction_backlog gauge
lethe_keybroker_destruction_backlog 2
# HELP lethe_keybroker_vault_errors_total Vault calls that failed for want of Vault: unreachable, sealed, or a server error.
# TYPE lethe_keybroker_vault_errors_total counter
lethe_keybroker_vault_errors_total 1
# HELP lethe_agent_bytes_sent_total Guest memory bytes (page payloads) this host sent as a migration source.
# TYPE lethe_agent_bytes_sent_total counter
lethe_agent_bytes_sent_total 4096
# HELP lethe_agent_migrations_total Ends of this host's part in migrations, by role (source, destination) and outcome (committed, failed, aborted).
# TYPE lethe_agent_migrations_total counter
lethe_agent_migrations_total{outcome="committed",role="source"} 1
# HELP lethe_agent_libvirt_errors_total Failed libvirt calls, by operation.
# TYPE lethe_agent_libvirt_errors_total counter
lethe_agent_libvirt_errors_total{op="migrate"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want),
		"lethe_keybroker_decisions_total", "lethe_keybroker_destruction_backlog", "lethe_keybroker_vault_errors_total",
		"lethe_agent_bytes_sent_total", "lethe_agent_migrations_total", "lethe_agent_libvirt_errors_total"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(m.Registry, "lethe_keybroker_release_duration_seconds"); n != 1 {
		t.Errorf("release duration series = %d, want 1", n)
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
	b, k, a := m.Broker(), m.Keybroker(), m.Agent()
	b.PhaseChanged(broker.PhaseAttesting, broker.PhaseKeysReleased, time.Second)
	b.Handshake(time.Second)
	m.NATSError("async")
	k.Decided(keybroker.EventRelease, keybroker.DecisionAllow, "")
	k.Released(keybroker.DecisionAllow, time.Second)
	k.VaultError()
	a.BytesSent(1)
	a.MigrationEnded(attest.RoleSource, "committed")
	a.LibvirtError("migrate")
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range families {
		name := f.GetName()
		if !strings.HasPrefix(name, "lethe_") {
			continue
		}
		n++
		if !strings.Contains(string(doc), "`"+name+"`") {
			t.Errorf("metric %s is not documented in docs/configuration.md", name)
		}
	}
	if n != 13 {
		t.Errorf("%d lethe metrics, want 13: update this test and the documentation together", n)
	}
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
