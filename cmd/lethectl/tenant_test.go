package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/policy"
)

// TestTenantRegisterOverNATS registers a tenant with the admin key and rotates its key, through
// a keybroker on real NATS and Vault.
func TestTenantRegisterOverNATS(t *testing.T) {
	srv := vaulttest.Start(t)
	v, err := attest.NewVerifier(attest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	t.Setenv("LETHECTL_CONFIG", "")
	t.Setenv("LETHE_CONFIG", "")
	t.Setenv("LETHE_ADMIN_KEY", "")
	t.Setenv("LETHE_TENANT", "")
	for _, k := range []string{"admin", "tenant", "recovery"} {
		if out, errOut, code := runLethectl(t, "keygen", "--name", k, "--out", filepath.Join(dir, k)); code != 0 {
			t.Fatalf("keygen %s: exit %d\n%s%s", k, code, out, errOut)
		}
	}
	if out, errOut, code := runLethectl(t, "keygen", "--out", filepath.Join(dir, "next")); code != 0 {
		t.Fatalf("keygen: exit %d\n%s%s", code, out, errOut)
	}
	adminPub, err := policy.ReadPublicKey(filepath.Join(dir, "admin", "admin.pub"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	kb, err := keybroker.New(keybroker.Config{Vault: srv.Client, Verifier: v, AdminKey: adminPub, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ns := serveKeybroker(t, kb, log)

	pub := filepath.Join(dir, "tenant", "tenant.pub")
	args := []string{"tenant", "register", "--tenant", "acme", "--pub", pub, "--recovery-pub", filepath.Join(dir, "recovery", "recovery.pub"), "--nats-url", ns.URL}

	_, errOut, code := runLethectl(t, append(args, "--admin-key", filepath.Join(dir, "tenant", "tenant.key"))...)
	if code == 0 || !strings.Contains(errOut, "unauthorized") {
		t.Errorf("register signed by another key than the admin's: exit %d, %q; want a failure naming unauthorized", code, errOut)
	}
	out, errOut, code := runLethectl(t, append(args, "--admin-key", filepath.Join(dir, "admin", "admin.key"), "-o", "json")...)
	if code != 0 {
		t.Fatalf("register: exit %d\n%s%s", code, out, errOut)
	}
	var got kbwire.RegisterTenantResponse
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("register output %q: %v", out, err)
	}
	tenantPub, err := policy.ReadPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(kbwire.RegisterTenantResponse{Tenant: "acme", KeyID: policy.KeyID(tenantPub), Recovery: true}, got); diff != "" {
		t.Errorf("register output (-want +got):\n%s", diff)
	}
	// The admin cannot re-key the tenant.
	_, errOut, code = runLethectl(t, "tenant", "register", "--tenant", "acme", "--pub", filepath.Join(dir, "next", "tenant.pub"), "--nats-url", ns.URL, "--admin-key", filepath.Join(dir, "admin", "admin.key"))
	if code == 0 || !strings.Contains(errOut, "unauthorized") {
		t.Errorf("admin re-key: exit %d, %q; want unauthorized", code, errOut)
	}

	rotate := []string{"tenant", "rotate-key", "--tenant", "acme", "--new-pub", filepath.Join(dir, "next", "tenant.pub"), "--nats-url", ns.URL}
	_, errOut, code = runLethectl(t, append(rotate, "--key", filepath.Join(dir, "admin", "admin.key"))...)
	if code == 0 || !strings.Contains(errOut, "unauthorized") {
		t.Errorf("rotation signed by another key: exit %d, %q; want unauthorized", code, errOut)
	}
	out, errOut, code = runLethectl(t, append(rotate, "--key", filepath.Join(dir, "tenant", "tenant.key"))...)
	if code != 0 || !strings.Contains(out, "rotation signed by the current key") {
		t.Fatalf("rotation: exit %d\n%s%s", code, out, errOut)
	}
}

// serveKeybroker serves kb's NATS API on an in-process NATS server until the test ends.
func serveKeybroker(t *testing.T, kb *keybroker.Keybroker, log *slog.Logger) *natstest.Server {
	t.Helper()
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
	return ns
}
