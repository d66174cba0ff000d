package keybroker

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

func TestRegisterTenant(t *testing.T) {
	e := newEnv(t)
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	_, notAdmin, _ := ed25519.GenerateKey(rand.Reader)
	now := e.clock.Now()
	signed := func(req kbwire.RegisterTenantRequest) *kbwire.AdminRequest {
		return adminRequest(t, testAdminKey, kbwire.OpTenantRegister, req, now)
	}
	replayed := signed(kbwire.RegisterTenantRequest{Tenant: "replay", PolicyKey: other})
	tests := map[string]struct {
		req  *kbwire.AdminRequest
		want error
	}{
		"no statement":              {req: &kbwire.AdminRequest{}, want: ErrUnauthorized},
		"signed by another key":     {req: adminRequest(t, notAdmin, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}, now), want: ErrUnauthorized},
		"for another operation":     {req: adminRequest(t, testAdminKey, kbwire.OpPolicyPublish, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}, now), want: ErrUnauthorized},
		"expired":                   {req: adminRequest(t, testAdminKey, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}, now.Add(-6*time.Minute)), want: ErrUnauthorized},
		"issued in the future":      {req: adminRequest(t, testAdminKey, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}, now.Add(2*time.Minute)), want: ErrUnauthorized},
		"new tenant":                {req: signed(kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub})},
		"same key again":            {req: signed(kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub})},
		"another key (re-key)":      {req: signed(kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: other}), want: ErrUnauthorized},
		"another recovery key":      {req: signed(kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub, RecoveryKey: other}), want: ErrUnauthorized},
		"first use":                 {req: replayed},
		"replayed":                  {req: replayed, want: ErrUnauthorized},
		"dash-prefix of a tenant":   {req: signed(kbwire.RegisterTenantRequest{Tenant: "demo-eu", PolicyKey: pub}), want: ErrInvalidRequest},
		"reserved name":             {req: signed(kbwire.RegisterTenantRequest{Tenant: "mig", PolicyKey: pub}), want: ErrInvalidRequest},
		"bad name":                  {req: signed(kbwire.RegisterTenantRequest{Tenant: "Acme/x", PolicyKey: pub}), want: ErrInvalidRequest},
		"short key":                 {req: signed(kbwire.RegisterTenantRequest{Tenant: "short", PolicyKey: pub[:31]}), want: ErrInvalidRequest},
		"recovery key = policy key": {req: signed(kbwire.RegisterTenantRequest{Tenant: "same", PolicyKey: pub, RecoveryKey: pub}), want: ErrInvalidRequest},
	}
	// Ordered: later cases build on earlier ones.
	for _, name := range []string{"no statement", "signed by another key", "for another operation", "expired", "issued in the future",
		"new tenant", "same key again", "another key (re-key)", "another recovery key", "first use", "replayed",
		"dash-prefix of a tenant", "reserved name", "bad name", "short key", "recovery key = policy key"} {
		tt := tests[name]
		t.Run(name, func(t *testing.T) {
			_, err := e.kb.RegisterTenant(t.Context(), tt.req)
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("RegisterTenant = %v, want %v", err, tt.want)
			}
			ev := e.audit.last(t)
			if ev.Kind != EventTenantRegister || (ev.Decision == DecisionAllow) != (tt.want == nil) || tt.want != nil && len(ev.Reasons) == 0 {
				t.Errorf("audit %+v", ev)
			}
		})
	}
	// The re-key was refused: acme's key is still the first.
	if rec, _, err := e.kb.loadTenant(t.Context(), "acme"); err != nil || !bytes.Equal(rec.PolicyKey, pub) {
		t.Errorf("acme after an admin re-key: %v, %v", rec, err)
	}
}

func TestRegisterTenantWithoutAdminKey(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg
	cfg.AdminKey, cfg.StateDir = nil, t.TempDir()
	kb, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	req := adminRequest(t, testAdminKey, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}, e.clock.Now())
	if _, err := kb.RegisterTenant(t.Context(), req); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("a keybroker without an admin key: %v, want ErrUnauthorized", err)
	}
}

func TestAdopt(t *testing.T) {
	e := newEnv(t)
	t.Run("allowed", func(t *testing.T) {
		a := e.attest("source", "adopt-vm1", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		resp, err := e.kb.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-vm1", Tenant: "demo", VM: "vm1", Policy: e.signedPolicy(1, nil), Agent: a.att})
		if err != nil {
			t.Fatal(err)
		}
		keys, err := a.key.Open("adopt-vm1", attest.RoleAdopt, resp.Sealed)
		if err != nil {
			t.Fatal(err)
		}
		if keys.TK != nil || len(keys.MDK) != 32 || keys.Epoch != 1 || resp.Epoch != 1 {
			t.Errorf("adoption released %+v", keys)
		}
		if !e.transitKeyExists("lethe-demo-vm1-e1") {
			t.Errorf("no epoch-1 key")
		}
		if ev := e.audit.last(t); ev.Kind != EventAdopt || ev.Decision != DecisionAllow || ev.Epoch != 1 {
			t.Errorf("audit %+v", ev)
		}
	})
	t.Run("again", func(t *testing.T) {
		a := e.attest("source", "adopt-vm1b", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		_, err := e.kb.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-vm1b", Tenant: "demo", VM: "vm1", Policy: e.signedPolicy(1, nil), Agent: a.att})
		if !errors.Is(err, ErrAlreadyAdopted) {
			t.Fatalf("second adoption = %v, want ErrAlreadyAdopted", err)
		}
	})
	t.Run("denied", func(t *testing.T) {
		// The policy wants destination hosts labelled zone=a; this one is not.
		signed := e.signedPolicy(1, func(y string) string {
			return strings.Replace(y, "    clean:\n", "    hostLabels: {zone: a}\n    clean:\n", 1)
		})
		a := e.attest("source", "adopt-vm2", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		_, err := e.kb.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-vm2", Tenant: "demo", VM: "vm2", Policy: signed, Agent: a.att, Host: kbwire.Host{Name: "h", Labels: map[string]string{"zone": "b"}}})
		if !errors.Is(err, ErrDenied) {
			t.Fatalf("Adopt = %v, want ErrDenied", err)
		}
		ev := e.audit.last(t)
		if ev.Decision != DecisionDeny || len(ev.Reasons) == 0 || !strings.Contains(strings.Join(ev.Reasons, " "), "zone") {
			t.Errorf("audit %+v, want a denial naming the label", ev)
		}
		if e.transitKeyExists("lethe-demo-vm2-e1") {
			t.Errorf("a denied adoption created a key")
		}
	})
}

func TestAppRole(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	a := e.admin
	if err := a.Sys().EnableAuthWithOptionsWithContext(ctx, "approle", &api.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	if err := a.Sys().PutPolicyWithContext(ctx, "lethe-keybroker", `
path "transit/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "lethe/*" { capabilities = ["create", "read", "update", "delete", "list"] }
`); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Logical().WriteWithContext(ctx, "auth/approle/role/keybroker", map[string]any{
		"token_policies": "lethe-keybroker", "token_ttl": "1h", "token_max_ttl": "2h",
	}); err != nil {
		t.Fatal(err)
	}
	s, err := a.Logical().ReadWithContext(ctx, "auth/approle/role/keybroker/role-id")
	if err != nil {
		t.Fatal(err)
	}
	roleID := s.Data["role_id"].(string)
	s, err = a.Logical().WriteWithContext(ctx, "auth/approle/role/keybroker/secret-id", nil)
	if err != nil {
		t.Fatal(err)
	}
	secretID := s.Data["secret_id"].(string)

	c, err := vaulttest.NewClient(e.vault.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	var logs bytes.Buffer
	cfg := e.cfg
	cfg.Vault, cfg.AppRole, cfg.StateDir = c, &AppRole{RoleID: roleID, SecretID: secretID}, t.TempDir()
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	kb, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kb.PublicKey(ctx); err != nil {
		t.Fatalf("a call with AppRole auth: %v", err)
	}
	first := c.Token()
	ttl, renewable, err := kb.tokenTTL(ctx)
	if err != nil || !renewable || ttl <= 0 {
		t.Fatalf("token: ttl %v renewable %v err %v", ttl, renewable, err)
	}
	if err := kb.renew(ctx, true); err != nil {
		t.Fatalf("renewing: %v", err)
	}
	// A token that can no longer be renewed is replaced by a new login.
	if err := kb.renew(ctx, false); err != nil {
		t.Fatalf("logging in again: %v", err)
	}
	if c.Token() == first {
		t.Errorf("no new token after a fresh login")
	}
	if _, err := kb.Receipt(ctx, "none"); !errors.Is(err, ErrUnknownMigration) {
		t.Errorf("a call with the new token: %v", err)
	}
	if strings.Contains(logs.String(), secretID) || strings.Contains(logs.String(), c.Token()) {
		t.Errorf("logs carry a credential")
	}
}
