package broker_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// hostState returns host's state as an operator lists it.
func hostState(t *testing.T, op *broker.Client, host string) *broker.HostView {
	t.Helper()
	hosts, err := op.ListHosts(t.Context(), &broker.ListHostsRequest{All: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range hosts.Hosts {
		if hosts.Hosts[i].Host == host {
			return &hosts.Hosts[i]
		}
	}
	t.Fatalf("host %s not listed", host)
	return nil
}

// TestDrainOfAHostAGuestIsMigratingInto: a migration into h2 started before h2's drain
// commits after it. The drain must not call h2 emptied (maintenance: the operator may power it
// off) while a guest is on its way in.
func TestDrainOfAHostAGuestIsMigratingInto(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	ctx := t.Context()
	op := e.operator()
	mig, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	e.waitMigration(mig.Migration.ID, inPhase(broker.PhaseTransferring))
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h2", Reason: "power off"})
	if err != nil {
		t.Fatal(err)
	}
	v := e.waitFleetOp(resp.Operation.ID, opEnded)
	if err := e.agents["h1"].Commit(mig.Migration.ID); err != nil {
		t.Fatal(err)
	}
	e.waitMigration(mig.Migration.ID, func(m *broker.Migration) bool { return m.Phase.Terminal() })
	guests, err := op.ListGuests(context.Background(), &broker.ListGuestsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	h := hostState(t, op, "h2")
	for _, g := range guests.Guests {
		if g.Host == "h2" && h.State == broker.HostMaintenance {
			t.Errorf("drain %s ended %s and left h2 in maintenance (%+v), yet guest %s/%s now runs on it", v.ID, v.State, h.StateRecord, g.Tenant, g.VM)
		}
	}
}

// TestFallbackSkipsACandidateCordonedSince: the keybroker denies h2, the migration's first
// destination; h3, its next candidate when placement ranked them, was cordoned since. A
// refused destination (a lying agent's refusal among them) must not carry the guest onto a
// host the operator has since closed: the fallback passes over h3 to h4.
func TestFallbackSkipsACandidateCordonedSince(t *testing.T) {
	e := fallbackEnv(t, map[string]string{"h2": "h2 microcode too old"}, nil)
	if _, err := e.operator().CordonHost(t.Context(), &broker.CordonRequest{Host: "h3", Reason: "power off"}); err != nil {
		t.Fatal(err)
	}
	id := startMigration(t, e, "h2", "h3", "h4")
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Destination != "h4" {
		t.Errorf("the fallback went to %s (phase %s, attempts %+v), want h4: h3 is cordoned", m.Destination, m.Phase, m.Attempts)
	}
}

// TestFleetRecordsAndOperationsAreTheBrokers: with the real NATS permissions of every other
// user, no one but the broker's store user may write the lethe-fleet bucket (the leader's
// lease, an operation's record, a host's state), read it, or reach the fleet operations: a
// tenant cannot publish on the operator subjects, its own subject of a fleet operation has no
// server, and it cannot subscribe to the events where operations and host states are told.
func TestFleetRecordsAndOperationsAreTheBrokers(t *testing.T) {
	e := authEnv(t)
	e.standard()
	kv := "$KV." + broker.FleetBucket + "."
	op := []byte(`{"id":"op-forged","kind":"drain","state":"running","hosts":["h1"],"items":[]}`)
	users := []struct {
		role natsauth.Role
		name string
	}{
		{natsauth.RoleTenant, "acme"}, {natsauth.RoleAgent, "h1"}, {natsauth.RoleOperator, ""},
		{natsauth.RoleBroker, ""}, {natsauth.RoleKeybroker, ""},
	}
	for _, u := range users {
		for _, subject := range []string{kv + "leader", kv + "op.op-forged", kv + "host.h2", "$JS.API.DIRECT.GET.KV_" + broker.FleetBucket} {
			t.Run(string(u.role)+"/"+subject, func(t *testing.T) {
				nc, _ := connectAs(t, e, u.role, u.name)
				if err := nc.Publish(subject, op); err != nil {
					t.Fatal(err)
				}
				if err := nc.Flush(); err != nil {
					t.Fatal(err)
				}
				if err := nc.LastError(); !errors.Is(err, nats.ErrPermissionViolation) {
					t.Errorf("%s publishing on %s: %v, want a permission violation", u.role, subject, err)
				}
			})
		}
	}
	tenantNC, _ := connectAs(t, e, natsauth.RoleTenant, "acme")
	if err := tenantNC.Publish(broker.OperatorSubject(broker.OpFleetDrain), []byte(`{"host":"h1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := tenantNC.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := tenantNC.LastError(); !errors.Is(err, nats.ErrPermissionViolation) {
		t.Errorf("a tenant publishing a drain on the operator subject: %v, want a permission violation", err)
	}
	for _, fop := range broker.OperatorOps {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		_, err := tenantNC.RequestWithContext(ctx, broker.TenantSubject("acme", fop), []byte(`{"host":"h1","id":"op-x"}`))
		cancel()
		if !errors.Is(err, nats.ErrNoResponders) && !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("a tenant's %s on its own subject: %v, want no server", fop, err)
		}
	}
	subNC, errs := connectAs(t, e, natsauth.RoleTenant, "acme")
	if _, err := subNC.SubscribeSync(broker.EventsSubjectPrefix + ".>"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errs:
		if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), broker.EventsSubjectPrefix) {
			t.Errorf("a tenant subscribing to the events: %v, want a permission violation", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("a tenant subscribed to the events without a permission violation")
	}
	if st, err := e.operator().ListFleetOps(t.Context(), &broker.ListFleetOpsRequest{}); err != nil || len(st.Operations) != 0 {
		t.Errorf("fleet operations after the attempts: %+v, %v; want none", st, err)
	}
	if h := hostState(t, e.operator(), "h1"); h.State != broker.HostSchedulable {
		t.Errorf("h1 after the attempts: %s, want schedulable", h.State)
	}
}

// TestDrainOfManyStuckGuestsEnds: a drain whose every guest is stuck records, for each, every
// host's reason. With many hosts, each cordoned with a long reason (an operator's, up to
// maxReason), and many guests, the operation's record outgrows a NATS message unless the
// reasons are bounded: its updates then fail for ever, and the drain never ends.
func TestDrainOfManyStuckGuestsEnds(t *testing.T) {
	const guests, hosts = 80, 30
	e := newEnv(t, natstest.Options{})
	e.startBroker("b1")
	var gs []agentapi.HostGuest
	for i := range guests {
		gs = append(gs, agentapi.HostGuest{Tenant: tenant, VM: fmt.Sprintf("vm%02d", i), MemoryBytes: 1 << 20})
	}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, gs...)
	for _, g := range gs {
		e.adopt(tenant, g.VM, "h1")
	}
	ctx := t.Context()
	op := e.operator()
	reason := strings.Repeat("r", 500)
	for i := range hosts {
		h := fmt.Sprintf("c%02d", i)
		e.addAgent(h, attest.PlatformEmulatedSEVSNP, "eu", nil)
		if _, err := op.CordonHost(ctx, &broker.CordonRequest{Host: h, Reason: reason}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	v := e.waitFleetOp(resp.Operation.ID, opEnded)
	if v.State != broker.FleetDone || v.Counts.Stuck != guests {
		t.Errorf("drain ended %s with %+v, want done with %d stuck", v.State, v.Counts, guests)
	}
	for _, it := range v.Items {
		if !strings.Contains(it.Reason, "cordoned by operator") {
			t.Errorf("%s stuck for %q, want the hosts' reasons", it.VM, it.Reason)
			break
		}
	}
}

// TestAbortRacesACommitInADrain: an operator aborts a drain while its migration in flight
// commits. Whichever wins, the operation ends aborted, says of each guest what became of it
// (moved where the guest now is, or failed or skipped where it still runs), starts nothing
// more, and leaves the drained host cordoned with its guests, not in maintenance.
func TestAbortRacesACommitInADrain(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.startBroker("b1")
	var gs []agentapi.HostGuest
	for i := range 3 {
		gs = append(gs, agentapi.HostGuest{Tenant: tenant, VM: fmt.Sprintf("vm%d", i), MemoryBytes: 1 << 20})
	}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, gs...)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	for _, g := range gs {
		e.adopt(tenant, g.VM, "h1")
	}
	ctx := t.Context()
	op := e.operator()
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h1", Limits: broker.Limits{MaxParallel: 1}})
	if err != nil {
		t.Fatal(err)
	}
	var mig string
	e.waitFleetOp(resp.Operation.ID, func(v *broker.FleetOpView) bool {
		for _, it := range v.Items {
			if it.Status == broker.ItemMigrating {
				mig = it.Migration
			}
		}
		return mig != ""
	})
	e.waitMigration(mig, inPhase(broker.PhaseTransferring))
	done := make(chan error, 1)
	go func() { done <- e.agents["h1"].Commit(mig) }()
	if _, err := op.AbortFleetOp(ctx, &broker.AbortFleetOpRequest{ID: resp.Operation.ID, Reason: "changed my mind"}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Logf("commit after the abort: %v", err)
	}
	v := e.waitFleetOp(resp.Operation.ID, opEnded)
	if v.State != broker.FleetAborted {
		t.Errorf("operation ended %s, want aborted", v.State)
	}
	guests, err := op.ListGuests(ctx, &broker.ListGuestsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	on := map[string]broker.Guest{}
	for _, g := range guests.Guests {
		on[g.VM] = g
	}
	left := 0
	for _, it := range v.Items {
		g := on[it.VM]
		switch it.Status {
		case broker.ItemMoved:
			if g.Host != "h2" {
				t.Errorf("%s moved, yet its guest is on %s", it.VM, g.Host)
			}
		case broker.ItemFailed, broker.ItemSkipped:
			left++
			if g.Host != "h1" {
				t.Errorf("%s %s, yet its guest is on %s", it.VM, it.Status, g.Host)
			}
		default:
			t.Errorf("%s ended %s", it.VM, it.Status)
		}
		if g.Migration != "" {
			if m, err := op.GetMigration(ctx, g.Migration); err == nil && !m.Phase.Terminal() {
				t.Errorf("%s still migrating (%s, %s) after the abort", it.VM, m.ID, m.Phase)
			}
		}
	}
	if h := hostState(t, op, "h1"); left > 0 && h.State != broker.HostCordoned {
		t.Errorf("h1 after the aborted drain left %d guests: %s, want cordoned", left, h.State)
	}
}
