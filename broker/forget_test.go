package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// report makes host's agent report guests (none: the VM was deleted).
func (e *env) report(host string, guests ...agentapi.HostGuest) {
	e.t.Helper()
	rec := e.agents[host].Record("eu", nil, guests...)
	nc := e.connect(natsauth.RoleAgent, host)
	if err := agentapi.PutHost(context.Background(), nc, &rec); err != nil {
		e.t.Fatalf("registering %s: %v", host, err)
	}
	if err := nc.Flush(); err != nil {
		e.t.Fatal(err)
	}
}

// keptKeys is a keybroker that, as the real one, refuses to adopt a guest it holds already,
// until it forgets it.
type keptKeys struct {
	*brokertest.KeyBroker
	mu      sync.Mutex
	adopted map[string]bool
}

func (k *keptKeys) Adopt(ctx context.Context, req *kbwire.AdoptRequest) (*kbwire.AdoptResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	key := broker.GuestKey(req.Tenant, req.VM)
	if k.adopted[key] {
		return nil, fmt.Errorf("calling keybroker adopt: %w", wireerr.New(kbwire.CodeAlreadyAdopted, "adopting "+key+": in epoch 1: guest already adopted"))
	}
	resp, err := k.KeyBroker.Adopt(ctx, req)
	if err == nil {
		k.adopted[key] = true
	}
	return resp, err
}

func (k *keptKeys) Forget(ctx context.Context, req *kbwire.ForgetRequest) (*kbwire.ForgetResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	resp, err := k.KeyBroker.Forget(ctx, req)
	if err == nil {
		delete(k.adopted, broker.GuestKey(req.Tenant, req.VM))
	}
	return resp, err
}

// signed stands for the statement lethectl signs: the fake keybroker verifies none; the real
// one, on a real Vault, does (keybroker's TestForget and TestForgetRefused, and
// keybroker/natsapi's TestAttackBrokerForgetsWithoutConsent).
var signed = []byte(`{"payloadType":"application/vnd.lethe.tenant-request+json"}`)

// TestForgetGuest: a tenant forgets its guest once the VM is gone, with a reason the audit
// record keeps: the broker passes its signed statement to the keybroker, which destroys the
// key, then drops its record; the guest is then neither listed nor migratable, and its name
// can be adopted again.
func TestForgetGuest(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	kb := &keptKeys{KeyBroker: e.kb, adopted: map[string]bool{}}
	e.cfg.KeyBroker = kb
	e.standard()
	ctx := t.Context()
	acme := e.tenant(tenant)
	audit := e.srv.Connect(t)
	sub, err := audit.SubscribeSync(broker.AuditSubject(broker.AuditGuestForget))
	if err != nil {
		t.Fatal(err)
	}
	if err := audit.Flush(); err != nil {
		t.Fatal(err)
	}

	_, err = acme.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Reason: "deleted", Signed: signed})
	if !errors.Is(err, broker.ErrFailedPrecondition) || !strings.Contains(err.Error(), "still runs guest acme.web") {
		t.Fatalf("forgetting a guest its live host still runs: %v, want ErrFailedPrecondition", err)
	}

	e.report("h1") // the VM is deleted
	if _, err := acme.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Reason: "deleted"}); !errors.Is(err, broker.ErrInvalid) || !strings.Contains(err.Error(), "signed") {
		t.Errorf("forgetting with no signed statement: %v, want ErrInvalid", err)
	}
	if n := len(e.kb.Forgets()); n != 0 {
		t.Fatalf("the keybroker was asked %d times before the broker's checks passed", n)
	}
	g, err := acme.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Reason: "VM deleted for good", Signed: signed})
	if err != nil {
		t.Fatal(err)
	}
	if g.Tenant != tenant || g.VM != vm || g.Host != "h1" || g.Epoch != 1 || g.WrappedMDK != "" {
		t.Errorf("forgotten record %+v: want acme/web on h1, epoch 1, no wrapped key", g)
	}
	want := []kbwire.ForgetRequest{{Tenant: tenant, VM: vm, Signed: signed}}
	if diff := cmp.Diff(want, e.kb.Forgets()); diff != "" {
		t.Errorf("the keybroker's forget requests (-want +got):\n%s", diff)
	}
	msg, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no audit record of the forget: %v", err)
	}
	var rec broker.AuditRecord
	if err := json.Unmarshal(msg.Data, &rec); err != nil {
		t.Fatal(err)
	}
	wantRec := broker.AuditRecord{Schema: broker.AuditSchema, Action: broker.AuditGuestForget, Broker: "b1", By: "tenant:acme",
		Target: "acme.web", Reason: "VM deleted for good", Tenant: tenant, VM: vm, Host: "h1"}
	if diff := cmp.Diff(wantRec, rec, cmpopts.IgnoreFields(broker.AuditRecord{}, "Time", "Detail")); diff != "" {
		t.Errorf("audit record (-want +got):\n%s", diff)
	}
	if !strings.Contains(rec.Detail, "the keybroker destroyed lethe-acme-web-e1") {
		t.Errorf("audit detail %q does not say the key was destroyed", rec.Detail)
	}

	list, err := acme.ListGuests(ctx, &broker.ListGuestsRequest{})
	if err != nil || len(list.Guests) != 0 {
		t.Errorf("guests after the forget: %+v, %v; want none", list, err)
	}
	if _, err := acme.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Signed: signed}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("forgetting it again: %v, want ErrNotFound", err)
	}
	if _, err := acme.CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("migrating a forgotten guest: %v, want ErrNotFound", err)
	}

	// A VM of that name runs again: the broker and the keybroker take it in afresh.
	e.report("h1", agentapi.HostGuest{Tenant: tenant, VM: vm, MemoryBytes: guestMiB << 20})
	g, err = acme.AdoptGuest(ctx, &broker.AdoptGuestRequest{VM: vm, Host: "h1"})
	if err != nil {
		t.Fatalf("adopting the name again: %v", err)
	}
	if g.Epoch != 1 || g.Host != "h1" {
		t.Errorf("adopted again: %+v", g)
	}
}

// TestForgetRefusedByTheKeybroker: a forget whose statement the keybroker refuses deletes
// nothing and says why; a guest the keybroker no longer holds (a forget interrupted after the
// keybroker's part) is dropped.
func TestForgetRefusedByTheKeybroker(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.kb.RefuseForget = "forgetting acme/web: the statement is not signed by acme's policy key: unauthorized"
	e.standard()
	ctx := t.Context()
	acme := e.tenant(tenant)
	e.report("h1")
	_, err := acme.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Signed: signed})
	if !errors.Is(err, broker.ErrDenied) || !strings.Contains(err.Error(), "not signed by acme's policy key") {
		t.Fatalf("a forget the keybroker refuses: %v, want ErrDenied saying why", err)
	}
	list, err := acme.ListGuests(ctx, &broker.ListGuestsRequest{})
	if err != nil || len(list.Guests) != 1 {
		t.Fatalf("guests after a refused forget: %+v, %v; want web still", list, err)
	}

	e.kb.RefuseForget = ""
	if _, err := e.kb.Forget(ctx, &kbwire.ForgetRequest{Tenant: tenant, VM: vm}); err != nil {
		t.Fatal(err) // the keybroker's part of an interrupted forget
	}
	if _, err := acme.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Signed: signed}); err != nil {
		t.Errorf("forgetting a guest the keybroker no longer holds: %v", err)
	}
}

// TestForgetDuringAMigration: a guest whose migration is in flight is not forgotten; the
// answer names the migration and how to abort it.
func TestForgetDuringAMigration(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	ctx := t.Context()
	acme := e.tenant(tenant)
	resp, err := acme.CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	e.report("h1") // even with its VM gone from the source's report
	_, err = e.operator().ForgetGuest(ctx, &broker.ForgetGuestRequest{Tenant: tenant, VM: vm, Reason: "gone", Signed: signed})
	if !errors.Is(err, broker.ErrConflict) || !strings.Contains(err.Error(), id) || !strings.Contains(err.Error(), "lethectl migrations abort "+id) {
		t.Fatalf("forgetting a migrating guest: %v, want ErrConflict naming %s and how to abort it", err, id)
	}
	if _, err := acme.AbortMigration(ctx, &broker.AbortMigrationRequest{ID: id}); err != nil {
		t.Fatal(err)
	}
	e.waitMigration(id, inPhase(broker.PhaseAborted))
	if _, err := e.operator().ForgetGuest(ctx, &broker.ForgetGuestRequest{Tenant: tenant, VM: vm, Reason: "gone", Signed: signed}); err != nil {
		t.Fatalf("forgetting once the migration ended: %v", err)
	}
}

// TestOperatorForgetsAGuestOfALostHost: an operator forgets any tenant's guest whose host is
// gone (its heartbeat stopped); it must name the tenant.
func TestOperatorForgetsAGuestOfALostHost(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	ctx := t.Context()
	op := e.operator()
	if _, err := op.ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm}); !errors.Is(err, broker.ErrInvalid) {
		t.Errorf("an operator naming no tenant: %v, want ErrInvalid", err)
	}
	if _, err := op.ForgetGuest(ctx, &broker.ForgetGuestRequest{Tenant: tenant, VM: vm, Reason: strings.Repeat("x", 513)}); !errors.Is(err, broker.ErrInvalid) {
		t.Errorf("a reason of 513 bytes: %v, want ErrInvalid", err)
	}
	e.clock.Advance(2 * time.Hour) // past the host TTL: h1 is decommissioned
	g, err := op.ForgetGuest(ctx, &broker.ForgetGuestRequest{Tenant: tenant, VM: vm, Reason: "h1 decommissioned", Signed: signed})
	if err != nil {
		t.Fatal(err)
	}
	if g.Host != "h1" {
		t.Errorf("forgotten record %+v", g)
	}
}
