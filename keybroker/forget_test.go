package keybroker

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
)

// forgetRequest is a forget of demo's vm, signed by key as a tenant statement (tenant true) or
// an admin statement, issued at now.
func forgetRequest(t testing.TB, key ed25519.PrivateKey, tenant bool, vm string, now time.Time) *kbwire.ForgetRequest {
	t.Helper()
	sign := kbwire.SignAdmin
	if tenant {
		sign = kbwire.SignTenant
	}
	signed, err := sign(kbwire.OpGuestForget, kbwire.ForgetGuestRequest{Tenant: "demo", VM: vm, Reason: "VM deleted"}, now, kbwire.MaxAdminValidity, key)
	if err != nil {
		t.Fatal(err)
	}
	return &kbwire.ForgetRequest{Tenant: "demo", VM: vm, Signed: signed}
}

// adoptAs adopts vm under adoption id (a guest adopted again needs a new one).
func (e *env) adoptAs(id, vm string) (*kbwire.AdoptResponse, error) {
	e.t.Helper()
	a := e.attest("source", id, attest.RoleAdopt, keybrokertest.CleanStatement(e.t))
	return e.kb.Adopt(e.t.Context(), &kbwire.AdoptRequest{AdoptionID: id, Tenant: "demo", VM: vm, Policy: e.signedPolicy(1, nil), Agent: a.att})
}

// TestForget: a guest forgotten on its tenant's statement loses its live key in Vault and its
// record, the forget is audited and logged, and the guest can then be adopted again, with a
// history that still verifies. The same holds for an admin's statement.
func TestForget(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	key := epochKeyName("demo", "vm1", 1)
	if _, err := e.adoptAs("adopt-vm1-again", "vm1"); !errors.Is(err, ErrAlreadyAdopted) {
		t.Fatalf("adopting vm1 before the forget: %v, want ErrAlreadyAdopted", err)
	}

	resp, err := e.kb.Forget(ctx, forgetRequest(t, e.tenantKey, true, "vm1", e.clock.Now()))
	if err != nil {
		t.Fatalf("Forget: %v", err)
	}
	if resp.Epoch != 1 || resp.By != "tenant" || len(resp.DestroyedKeys) != 1 || resp.DestroyedKeys[0] != key || !strings.HasPrefix(resp.ForgetID, "forget-") {
		t.Errorf("Forget: %+v", resp)
	}
	if e.transitKeyExists(key) {
		t.Errorf("key %s still in Vault after the forget", key)
	}
	if g := e.guest("vm1"); g.Epoch != 0 || g.Migration != nil || g.WrappedMDK != "" || g.LastMigration != resp.ForgetID {
		t.Errorf("guest record after the forget: %+v", g)
	}
	ev := e.audit.last(t)
	if ev.Kind != EventForget || ev.Decision != DecisionAllow || ev.By != "tenant" || ev.Reason != "VM deleted" || ev.Epoch != 1 || len(ev.Keys) != 1 {
		t.Errorf("audit event: %+v", ev)
	}
	if _, err := e.kb.Forget(ctx, forgetRequest(t, e.tenantKey, true, "vm1", e.clock.Now())); !errors.Is(err, ErrNotAdopted) {
		t.Errorf("forgetting it again: %v, want ErrNotAdopted", err)
	}

	again, err := e.adoptAs("adopt-vm1-again", "vm1")
	if err != nil {
		t.Fatalf("adopting vm1 again after the forget: %v", err)
	}
	if again.Epoch != 1 || !e.transitKeyExists(key) {
		t.Errorf("adopted again: epoch %d, key there %v", again.Epoch, e.transitKeyExists(key))
	}
	// And once more, on the admin's statement.
	if resp, err := e.kb.Forget(ctx, forgetRequest(t, testAdminKey, false, "vm1", e.clock.Now())); err != nil || resp.By != "admin" {
		t.Fatalf("Forget by the admin: %+v, %v", resp, err)
	}

	rep, err := e.auditHistory(e.kb, "vm1", nil)
	if err != nil {
		t.Fatalf("verifying vm1's history: %v", err)
	}
	var kinds []string
	for _, en := range rep.Entries {
		kinds = append(kinds, string(en.Kind))
	}
	if got, want := strings.Join(kinds, " "), "adopt deny forget deny adopt forget"; got != want || rep.Live != 0 || len(rep.Residencies) != 2 {
		t.Errorf("vm1's history: %s, live %d, %d residencies; want %s, not adopted, 2 residencies", got, rep.Live, len(rep.Residencies), want)
	}
}

// TestForgetRefused: a forget without a valid statement of the guest's tenant or the admin, or
// one replayed, expired, for another operation or another guest, is refused and the key stays;
// so is one while a migration holds released keys, whose statement (not spent) then works once
// the migration is aborted.
func TestForgetRefused(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	key := epochKeyName("demo", "vm1", 1)
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	now := e.clock.Now()

	used := forgetRequest(t, testAdminKey, false, "vm1", now)
	e.adopt("vm2")
	if _, err := e.kb.Forget(ctx, &kbwire.ForgetRequest{Tenant: "demo", VM: "vm2", Signed: used.Signed}); err == nil {
		t.Fatal("a statement for vm1 forgot vm2")
	}

	otherOp, err := kbwire.SignTenant(kbwire.OpTenantRegister, kbwire.ForgetGuestRequest{Tenant: "demo", VM: "vm1"}, now, time.Minute, e.tenantKey)
	if err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		req  *kbwire.ForgetRequest
		want error
	}{
		"no statement":                  {&kbwire.ForgetRequest{Tenant: "demo", VM: "vm1"}, ErrUnauthorized},
		"signed by a stranger (tenant)": {forgetRequest(t, stranger, true, "vm1", now), ErrUnauthorized},
		"signed by a stranger (admin)":  {forgetRequest(t, stranger, false, "vm1", now), ErrUnauthorized},
		"the tenant's key as admin":     {forgetRequest(t, e.tenantKey, false, "vm1", now), ErrUnauthorized},
		"the admin's key as the tenant": {forgetRequest(t, testAdminKey, true, "vm1", now), ErrUnauthorized},
		"expired":                       {forgetRequest(t, e.tenantKey, true, "vm1", now.Add(-6*time.Minute)), ErrUnauthorized},
		"for another operation":         {&kbwire.ForgetRequest{Tenant: "demo", VM: "vm1", Signed: otherOp}, ErrUnauthorized},
		"naming another guest":          {&kbwire.ForgetRequest{Tenant: "demo", VM: "vm1", Signed: forgetRequest(t, e.tenantKey, true, "vm2", now).Signed}, ErrInvalidRequest},
	}
	for name, tt := range tests {
		if _, err := e.kb.Forget(ctx, tt.req); !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", name, err, tt.want)
		}
	}
	if !e.transitKeyExists(key) || e.guest("vm1").Epoch != 1 {
		t.Fatal("a refused forget destroyed the key or dropped the guest")
	}

	// A release holds keys: refused, and the statement is not spent.
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(ctx, m.req); err != nil {
		t.Fatal(err)
	}
	_, err = e.kb.Forget(ctx, used)
	if !errors.Is(err, ErrGuestBusy) || !strings.Contains(err.Error(), "migration m1 of demo/vm1 holds released keys") {
		t.Fatalf("forgetting a guest whose migration is released: %v, want ErrGuestBusy naming m1", err)
	}
	if !e.transitKeyExists(key) {
		t.Fatal("a refused forget destroyed the key")
	}
	if _, err := e.kb.Destroy(ctx, e.abort("m1", "vm1")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.Forget(ctx, used); err != nil {
		t.Fatalf("forgetting once the migration aborted: %v", err)
	}
	if _, err := e.kb.Forget(ctx, used); !errors.Is(err, ErrUnauthorized) && !errors.Is(err, ErrNotAdopted) {
		t.Errorf("replaying the statement: %v, want refused", err)
	}
	// Replayed on a guest adopted again: the statement is spent.
	if _, err := e.adoptAs("adopt-vm1-again", "vm1"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.Forget(ctx, used); !errors.Is(err, ErrUnauthorized) || !strings.Contains(err.Error(), "already used") {
		t.Errorf("replaying the statement on the guest adopted again: %v, want ErrUnauthorized: already used", err)
	}
	if !e.transitKeyExists(key) {
		t.Error("a replayed forget destroyed the new adoption's key")
	}
}

// TestForgetRetried: Vault stops taking the guest's record after the forget destroyed the key
// and logged it; the forget stays journaled, Run completes it, and the history holds one forget
// entry, so that it still verifies.
func TestForgetRetried(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	var writes atomic.Int32
	e.proxy.Block(func(r *http.Request) bool {
		// The first write of the guest's record (the hold) goes through, the last does not.
		return r.Method != http.MethodGet && strings.Contains(r.URL.Path, "/data/guests/demo/vm1") && writes.Add(1) > 1
	})
	_, err := e.kb.Forget(ctx, forgetRequest(t, e.tenantKey, true, "vm1", e.clock.Now()))
	if !errors.Is(err, ErrDestructionPending) {
		e.proxy.Restore()
		t.Fatalf("Forget with the guest's record blocked = %v, want ErrDestructionPending", err)
	}
	if e.transitKeyExists(epochKeyName("demo", "vm1", 1)) {
		t.Error("the key survived the forget's first attempt")
	}
	var pending *journalEntry
	for _, p := range e.kb.jnl.pending() {
		if p.Kind == kindForget {
			pending = p
		}
	}
	if pending == nil {
		e.proxy.Restore()
		t.Fatal("the forget is not journaled")
	}
	id := pending.MigrationID
	e.proxy.Restore()
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- e.kb.Run(runCtx) }()
	select {
	case <-pending.done:
	case <-ctx.Done():
	}
	cancel()
	<-done
	if g := e.guest("vm1"); g.Epoch != 0 || g.Migration != nil {
		t.Fatalf("guest record after the retried forget: %+v", g)
	}
	if ev := e.audit.last(t); ev.Kind != EventForget || ev.Decision != DecisionAllow || ev.MigrationID != id || ev.By != "tenant" || ev.Reason != "VM deleted" {
		t.Errorf("audit event of the retried forget: %+v", ev)
	}
	rep, err := e.auditHistory(e.kb, "vm1", nil)
	if err != nil {
		t.Fatalf("history after the retried forget: %v", err)
	}
	if got := kinds(rep); got != "adopt:adopt-vm1 forget:"+id {
		t.Errorf("history after the retried forget: %s", got)
	}
	if _, err := e.adoptAs("adopt-vm1-again", "vm1"); err != nil {
		t.Errorf("adopting again after the retried forget: %v", err)
	}
}
