package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
)

// waitFleetOp polls operation id until it ends, and fails the test after 10 s.
func waitFleetOp(t *testing.T, op *broker.Client, id string) *broker.FleetOpView {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := op.GetFleetOp(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		if v.State.Terminal() {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("operation %s still %s: %+v", id, v.State, v.Items)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

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
	v := waitFleetOp(t, op, resp.Operation.ID)
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
