package agentapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/agentapi/agentapitest"
	"github.com/nats-io/nats.go"
)

func TestParseProgressSubject(t *testing.T) {
	tests := map[string]struct {
		subject   string
		host, mig string
		ok        bool
	}{
		"valid":         {subject: "lethe.v1.agent.h1.progress.mig-1", host: "h1", mig: "mig-1", ok: true},
		"other prefix":  {subject: "lethe.v2.agent.h1.progress.mig-1"},
		"not progress":  {subject: "lethe.v1.agent.h1.status.mig-1"},
		"extra token":   {subject: "lethe.v1.agent.h1.progress.mig-1.x"},
		"wildcard host": {subject: "lethe.v1.agent.*.progress.mig-1"},
		"empty":         {subject: ""},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			host, mig, ok := agentapi.ParseProgressSubject(tc.subject)
			if diff := cmp.Diff([]any{tc.host, tc.mig, tc.ok}, []any{host, mig, ok}); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func FuzzParseProgressSubject(f *testing.F) {
	f.Add("lethe.v1.agent.h1.progress.mig-1")
	f.Add("lethe.v1.agent..progress.")
	f.Fuzz(func(t *testing.T, s string) {
		host, mig, ok := agentapi.ParseProgressSubject(s)
		if ok && (agentapi.ValidName(host) != nil || agentapi.ValidName(mig) != nil || agentapi.ProgressSubject(host, mig) != s) {
			t.Errorf("accepted %q as host %q migration %q", s, host, mig)
		}
	})
}

func FuzzProgressDecode(f *testing.F) {
	f.Add([]byte(`{"migrationId":"m","phase":"precopy","bytes":1,"round":2,"eta":1000}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var p agentapi.Progress
		if json.Unmarshal(b, &p) != nil {
			return
		}
		if _, err := json.Marshal(p); err != nil {
			t.Errorf("re-encoding decoded progress: %v", err)
		}
	})
}

func TestServeAndClient(t *testing.T) {
	srv := natstest.Start(t, natstest.Options{})
	agentConn := srv.Connect(t)
	fake := agentapitest.New("h1", attest.PlatformEmulatedSEVSNP)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- agentapi.Serve(ctx, agentConn, "h1", fake) }()
	t.Cleanup(func() { cancel(); <-done })

	nc := srv.Connect(t)
	progress := make(chan *nats.Msg, 8)
	if _, err := nc.ChanSubscribe(agentapi.ProgressSubject("h1", "m1"), progress); err != nil {
		t.Fatal(err)
	}
	c := agentapi.NewClient(nc, 0)
	// Wait for the service to answer (Serve registers asynchronously).
	var err error
	for range 50 {
		if _, err = c.Status(t.Context(), "h1", &agentapi.StatusRequest{MigrationID: "m1"}); err == nil {
			break
		}
		if !errors.Is(err, nats.ErrNoResponders) {
			t.Fatal(err)
		}
		_ = nc.Flush()
	}
	if err != nil {
		t.Fatal(err)
	}
	ev, err := c.Attest(t.Context(), "h1", &agentapi.AttestRequest{MigrationID: "m1", Role: attest.RoleSource, Nonce: []byte("n")})
	if err != nil || ev.Platform != attest.PlatformEmulatedSEVSNP {
		t.Fatalf("attest: %v %v", ev, err)
	}
	// Transfer before keys: the handler's ErrBadRequest reaches the client as a code.
	_, err = c.Transfer(t.Context(), "h1", &agentapi.TransferRequest{MigrationID: "m1", DataEndpoint: "x:1"})
	if !errors.Is(err, agentapi.ErrBadRequest) {
		t.Errorf("transfer without keys: %v, want ErrBadRequest", err)
	}
	if err := c.Keys(t.Context(), "h1", &agentapi.KeysRequest{MigrationID: "m1", Role: attest.RoleSource, SealedKeys: []byte("k")}); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second call re-attaches
		p, err := c.Transfer(t.Context(), "h1", &agentapi.TransferRequest{MigrationID: "m1", DataEndpoint: "x:1"})
		if err != nil || p.Phase != agentapi.TransferStarted {
			t.Fatalf("transfer: %+v %v", p, err)
		}
	}
	if err := fake.Commit("m1"); err != nil {
		t.Fatal(err)
	}
	var phases []agentapi.TransferPhase
	for range 3 {
		var p agentapi.Progress
		if err := json.Unmarshal((<-progress).Data, &p); err != nil {
			t.Fatal(err)
		}
		phases = append(phases, p.Phase)
	}
	want := []agentapi.TransferPhase{agentapi.TransferPrecopy, agentapi.TransferCutover, agentapi.TransferCommitted}
	if diff := cmp.Diff(want, phases); diff != "" {
		t.Errorf("progress (-want +got):\n%s", diff)
	}
	if fake.CallCount(agentapi.OpTransfer, "m1") != 3 {
		t.Errorf("transfer calls = %d, want 3", fake.CallCount(agentapi.OpTransfer, "m1"))
	}
	if _, err := c.Attest(t.Context(), "bad.host", &agentapi.AttestRequest{}); err == nil {
		t.Error("invalid host name accepted")
	}
}
