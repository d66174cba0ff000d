package keybroker

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/dsse"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/policy"
)

// policyFor returns the CI policy of tenant demo named name, with policySvn svn, covering
// guests (a YAML flow list such as `[vm1, "web-*"]`; empty: no spec.guests line), signed by key.
func (e *env) policyFor(key ed25519.PrivateKey, name string, svn uint64, guests string) []byte {
	e.t.Helper()
	b, err := os.ReadFile("../examples/policies/ci-emulated.yaml")
	if err != nil {
		e.t.Fatal(err)
	}
	y := strings.Replace(string(b), "policySvn: 1", "policySvn: "+strconv.FormatUint(svn, 10), 1)
	y = strings.Replace(y, "name: ci-emulated", "name: "+name, 1)
	repl := ""
	if guests != "" {
		repl = "  guests: " + guests
	}
	y = strings.Replace(y, `  guests: ["*"]`, repl, 1)
	env, err := policy.Sign("p.yaml", []byte(y), key)
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := env.Marshal()
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// rotation signs a key rotation of tenant from the key named currentID to newKey.
func rotation(t *testing.T, tenant string, current ed25519.PublicKey, newKey, newRecovery ed25519.PublicKey, signer ed25519.PrivateKey) *kbwire.RotateKeyRequest {
	t.Helper()
	signed, err := kbwire.SignRotation(&kbwire.KeyRotation{Tenant: tenant, CurrentKeyID: dsse.KeyID(current), NewKey: newKey, NewRecoveryKey: newRecovery}, signer)
	if err != nil {
		t.Fatal(err)
	}
	return &kbwire.RotateKeyRequest{Signed: signed}
}

func wantRefused(t *testing.T, e *env, err error, kind EventKind, want error, reason string) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("got %v, want %v", err, want)
	}
	ev := e.audit.last(t)
	if ev.Kind != kind || ev.Decision != DecisionDeny || !strings.Contains(strings.Join(ev.Reasons, " "), reason) {
		t.Errorf("audit %+v; want a %s denial naming %q", ev, kind, reason)
	}
}

// TestPolicySelector: a policy the tenant signed for some guests never opens another.
func TestPolicySelector(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	e.adopt("vm2")
	sandbox := e.policyFor(e.tenantKey, "sandbox", 1, `[sandbox, "sb-*"]`)

	t.Run("release of another guest", func(t *testing.T) {
		m := e.newMigration("m1", "vm1", "destination", sandbox)
		_, err := e.kb.Release(t.Context(), m.req)
		wantRefused(t, e, err, EventRelease, ErrPolicyRejected, "not vm1")
	})
	t.Run("adoption of another guest", func(t *testing.T) {
		a := e.attest("source", "adopt-prod", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		_, err := e.kb.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-prod", Tenant: "demo", VM: "prod", Policy: sandbox, Agent: a.att})
		wantRefused(t, e, err, EventAdopt, ErrPolicyRejected, "not prod")
		if e.transitKeyExists("lethe-demo-prod-e1") {
			t.Error("a refused adoption created a key")
		}
	})
	t.Run("reissue for another guest", func(t *testing.T) {
		a := e.attest("source", "reissue-vm2", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		_, err := e.kb.Reissue(t.Context(), &kbwire.ReissueRequest{ReissueID: "reissue-vm2", Tenant: "demo", VM: "vm2", Policy: sandbox, Agent: a.att})
		wantRefused(t, e, err, EventReissue, ErrPolicyRejected, "not vm2")
	})
	t.Run("no selector covers nothing", func(t *testing.T) {
		m := e.newMigration("m2", "vm1", "destination", e.policyFor(e.tenantKey, "bare", 1, ""))
		_, err := e.kb.Release(t.Context(), m.req)
		wantRefused(t, e, err, EventRelease, ErrPolicyRejected, "covers no guest")
	})
	t.Run("name and prefix select", func(t *testing.T) {
		m := e.newMigration("m3", "vm1", "destination", e.policyFor(e.tenantKey, "prod", 1, `[vm1]`))
		if _, err := e.kb.Release(t.Context(), m.req); err != nil {
			t.Fatalf("Release under a policy naming vm1: %v", err)
		}
		m = e.newMigration("m4", "vm2", "destination", e.policyFor(e.tenantKey, "prod", 1, `["vm*"]`))
		if _, err := e.kb.Release(t.Context(), m.req); err != nil {
			t.Fatalf("Release under a policy covering vm*: %v", err)
		}
	})
}

// TestPublishPolicy: only the tenant's signature raises a floor, per (tenant, name), and a
// stale policy the broker kept is refused afterwards.
func TestPublishPolicy(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	e.adopt("vm2")
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	stale := e.signedPolicy(4, nil)

	publish := func(signed []byte) (*kbwire.PublishPolicyResponse, error) {
		return e.kb.PublishPolicy(t.Context(), &kbwire.PublishPolicyRequest{Policy: signed})
	}
	resp, err := publish(e.signedPolicy(5, nil))
	if err != nil || resp.Tenant != "demo" || resp.Name != "ci-emulated" || resp.Floor != 5 {
		t.Fatalf("publishing policySvn 5: %+v, %v", resp, err)
	}
	if ev := e.audit.last(t); ev.Kind != EventPublishPolicy || ev.Decision != DecisionAllow || ev.PolicySVN != 5 || ev.Tenant != "demo" {
		t.Errorf("audit %+v", ev)
	}
	if resp, err := publish(e.signedPolicy(5, nil)); err != nil || resp.Floor != 5 {
		t.Errorf("publishing the floor again: %+v, %v", resp, err)
	}

	t.Run("lower policySvn", func(t *testing.T) {
		_, err := publish(stale)
		wantRefused(t, e, err, EventPublishPolicy, ErrPolicyRejected, "rollback")
		if !errors.Is(err, policy.ErrRollback) {
			t.Errorf("%v does not match policy.ErrRollback", err)
		}
	})
	t.Run("signed by another key", func(t *testing.T) {
		_, err := publish(e.policyFor(stranger, "ci-emulated", 99, `["*"]`))
		wantRefused(t, e, err, EventPublishPolicy, ErrPolicyRejected, "signature")
	})
	t.Run("unknown tenant", func(t *testing.T) {
		b, _ := os.ReadFile("../examples/policies/mixed.yaml")
		env, err := policy.Sign("mixed.yaml", b, e.tenantKey)
		if err != nil {
			t.Fatal(err)
		}
		signed, _ := env.Marshal()
		_, err = publish(signed)
		wantRefused(t, e, err, EventPublishPolicy, ErrUnknownTenant, "acme")
	})
	t.Run("not an envelope", func(t *testing.T) {
		_, err := publish([]byte(`{"payload":"eA=="}`))
		wantRefused(t, e, err, EventPublishPolicy, ErrInvalidRequest, "envelope")
	})
	t.Run("stale policy at release", func(t *testing.T) {
		m := e.newMigration("m1", "vm1", "destination", stale)
		_, err := e.kb.Release(t.Context(), m.req)
		wantRefused(t, e, err, EventRelease, ErrPolicyRejected, "floor")
		if !errors.Is(err, policy.ErrRollback) {
			t.Errorf("%v does not match policy.ErrRollback", err)
		}
		a := e.attest("source", "adopt-vm3", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		_, err = e.kb.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-vm3", Tenant: "demo", VM: "vm3", Policy: stale, Agent: a.att})
		wantRefused(t, e, err, EventAdopt, ErrPolicyRejected, "floor")
	})
	t.Run("floors are per policy name", func(t *testing.T) {
		m := e.newMigration("m2", "vm2", "destination", e.policyFor(e.tenantKey, "other-name", 1, `["*"]`))
		if _, err := e.kb.Release(t.Context(), m.req); err != nil {
			t.Fatalf("Release under another name's policySvn 1: %v", err)
		}
	})
	t.Run("published policy at release", func(t *testing.T) {
		m := e.newMigration("m3", "vm1", "destination", e.signedPolicy(5, nil))
		if _, err := e.kb.Release(t.Context(), m.req); err != nil {
			t.Fatalf("Release under the published policy: %v", err)
		}
	})
	t.Run("another keybroker sees the floor", func(t *testing.T) {
		cfg := e.cfg
		cfg.StateDir = t.TempDir()
		kb2, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		a := e.attest("source", "adopt-vm4", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		if _, err := kb2.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-vm4", Tenant: "demo", VM: "vm4", Policy: stale, Agent: a.att}); !errors.Is(err, policy.ErrRollback) {
			t.Fatalf("another keybroker adopting under the stale policy: %v, want a rollback", err)
		}
	})
}

// TestRotateKey: the tenant's key changes only by a statement of its current (or recovery)
// key; the admin cannot re-key it.
func TestRotateKey(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	oldKey := e.tenantKey
	oldPub := oldKey.Public().(ed25519.PublicKey)
	newPub, newKey, _ := ed25519.GenerateKey(rand.Reader)
	otherPub, otherKey, _ := ed25519.GenerateKey(rand.Reader)

	t.Run("admin re-key", func(t *testing.T) {
		_, err := e.kb.RegisterTenant(t.Context(), adminRequest(t, testAdminKey, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "demo", PolicyKey: otherPub}, e.clock.Now()))
		wantRefused(t, e, err, EventTenantRegister, ErrUnauthorized, "only the tenant")
	})
	t.Run("signed by another key", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rotation(t, "demo", oldPub, otherPub, nil, otherKey))
		wantRefused(t, e, err, EventRotateKey, ErrUnauthorized, "not signed")
	})
	t.Run("naming another current key", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rotation(t, "demo", otherPub, newPub, nil, oldKey))
		wantRefused(t, e, err, EventRotateKey, ErrUnauthorized, "replaces key")
	})
	t.Run("not a statement", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), &kbwire.RotateKeyRequest{Signed: []byte("{}")})
		wantRefused(t, e, err, EventRotateKey, ErrInvalidRequest, "malformed")
	})
	rot := rotation(t, "demo", oldPub, newPub, nil, oldKey)
	t.Run("signed by the current key", func(t *testing.T) {
		resp, err := e.kb.RotateKey(t.Context(), rot)
		if err != nil || resp.KeyID != dsse.KeyID(newPub) || resp.Recovery {
			t.Fatalf("RotateKey: %+v, %v", resp, err)
		}
		if ev := e.audit.last(t); ev.Kind != EventRotateKey || ev.Decision != DecisionAllow || ev.Tenant != "demo" {
			t.Errorf("audit %+v", ev)
		}
	})
	t.Run("replayed", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rot)
		wantRefused(t, e, err, EventRotateKey, ErrUnauthorized, "replaces key")
	})
	t.Run("back to a retired key", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rotation(t, "demo", newPub, oldPub, nil, newKey))
		wantRefused(t, e, err, EventRotateKey, ErrInvalidRequest, "already")
	})
	t.Run("old key's policy refused", func(t *testing.T) {
		m := e.newMigration("m1", "vm1", "destination", e.policyFor(oldKey, "ci-emulated", 1, `["*"]`))
		_, err := e.kb.Release(t.Context(), m.req)
		wantRefused(t, e, err, EventRelease, ErrPolicyRejected, "signature")
	})
	t.Run("new key's policy accepted", func(t *testing.T) {
		m := e.newMigration("m2", "vm1", "destination", e.policyFor(newKey, "ci-emulated", 1, `["*"]`))
		if _, err := e.kb.Release(t.Context(), m.req); err != nil {
			t.Fatalf("Release under the new key's policy: %v", err)
		}
	})
}

// TestRecoverKey: a recovery key registered at enrolment replaces a lost policy key.
func TestRecoverKey(t *testing.T) {
	e := newEnv(t)
	lostPub, lostKey, _ := ed25519.GenerateKey(rand.Reader)
	recPub, recKey, _ := ed25519.GenerateKey(rand.Reader)
	newPub, newKey, _ := ed25519.GenerateKey(rand.Reader)
	rec2Pub, _, _ := ed25519.GenerateKey(rand.Reader)
	resp, err := e.kb.RegisterTenant(t.Context(), adminRequest(t, testAdminKey, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: lostPub, RecoveryKey: recPub}, e.clock.Now()))
	if err != nil || !resp.Recovery {
		t.Fatalf("registering acme with a recovery key: %+v, %v", resp, err)
	}
	t.Run("policy key may not replace the recovery key", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rotation(t, "acme", lostPub, newPub, rec2Pub, lostKey))
		wantRefused(t, e, err, EventRotateKey, ErrUnauthorized, "recovery key")
	})
	t.Run("new key is the recovery key", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rotation(t, "acme", lostPub, recPub, nil, lostKey))
		wantRefused(t, e, err, EventRotateKey, ErrInvalidRequest, "recovery key")
	})
	t.Run("signed by the recovery key", func(t *testing.T) {
		resp, err := e.kb.RotateKey(t.Context(), rotation(t, "acme", lostPub, newPub, rec2Pub, recKey))
		if err != nil || !resp.Recovery || resp.KeyID != dsse.KeyID(newPub) {
			t.Fatalf("recovery: %+v, %v", resp, err)
		}
		if ev := e.audit.last(t); ev.Kind != EventRecoverKey || ev.Decision != DecisionAllow || ev.Tenant != "acme" {
			t.Errorf("audit %+v; want a recover-key event", ev)
		}
	})
	t.Run("the replaced recovery key is gone", func(t *testing.T) {
		_, err := e.kb.RotateKey(t.Context(), rotation(t, "acme", newPub, lostPub, nil, recKey))
		wantRefused(t, e, err, EventRotateKey, ErrUnauthorized, "neither")
	})
	t.Run("the new key rotates", func(t *testing.T) {
		if _, err := e.kb.RotateKey(t.Context(), rotation(t, "acme", newPub, rec2Pub[:0:0], nil, newKey)); err == nil {
			t.Fatal("a rotation to an empty key was accepted")
		}
		next, _, _ := ed25519.GenerateKey(rand.Reader)
		if _, err := e.kb.RotateKey(t.Context(), rotation(t, "acme", newPub, next, nil, newKey)); err != nil {
			t.Fatalf("rotation by the recovered key: %v", err)
		}
	})
}
