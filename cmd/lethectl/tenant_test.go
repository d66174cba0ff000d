package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// TestTenantRegisterOverNATS registers a tenant through a keybroker on real NATS and Vault.
func TestTenantRegisterOverNATS(t *testing.T) {
	srv := vaulttest.Start(t)
	v, err := attest.NewVerifier(attest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	kb, err := keybroker.New(keybroker.Config{Vault: srv.Client, Verifier: v, AdminToken: "the-admin-token", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ns := natstest.Start(t, natstest.Options{})
	svc, err := natsapi.New(natsapi.Config{Conn: ns.Connect(t), Keybroker: kb, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-svc.Started():
	case err := <-done:
		t.Fatalf("service ended before it started: %v", err)
	}

	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	t.Setenv("LETHECTL_CONFIG", "")
	t.Setenv("LETHE_ADMIN_TOKEN", "")
	if out, errOut, code := runLethectl(t, "keygen", "--out", filepath.Join(dir, "keys")); code != 0 {
		t.Fatalf("keygen: exit %d\n%s%s", code, out, errOut)
	}
	pub := filepath.Join(dir, "keys", "tenant.pub")
	for name, token := range map[string]string{"good": "the-admin-token", "bad": "not-the-admin-token"} {
		if err := os.WriteFile(filepath.Join(dir, name+".token"), []byte(token+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"tenant", "register", "--tenant", "acme", "--pub", pub, "--nats-url", ns.URL}

	_, errOut, code := runLethectl(t, append(args, "--admin-token-file", filepath.Join(dir, "bad.token"))...)
	if code == 0 || !strings.Contains(errOut, "unauthorized") {
		t.Errorf("register with a wrong admin token: exit %d, %q; want a failure naming unauthorized", code, errOut)
	}
	out, errOut, code := runLethectl(t, append(args, "--admin-token-file", filepath.Join(dir, "good.token"), "-o", "json")...)
	if code != 0 {
		t.Fatalf("register: exit %d\n%s%s", code, out, errOut)
	}
	var got keybroker.RegisterTenantResponse
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("register output %q: %v", out, err)
	}
	if diff := cmp.Diff(keybroker.RegisterTenantResponse{Tenant: "acme"}, got); diff != "" {
		t.Errorf("register output (-want +got):\n%s", diff)
	}
}
