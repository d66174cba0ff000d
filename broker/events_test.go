package broker_test

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
)

// TestMigrationEventsPagedAndOwnersOnly: a migration's events are read back from LETHE_EVENTS
// through the broker API, page by page, by its tenant and operators; another tenant finds
// no such migration.
func TestMigrationEventsPagedAndOwnersOnly(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true
	ctx := t.Context()
	resp, err := e.tenant(tenant).CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (%s), want Erased", m.Phase, m.AbortReason)
	}

	// readAll pages through the events with pages of 2.
	readAll := func(c *broker.Client) ([]broker.StoredEvent, error) {
		var all []broker.StoredEvent
		var after uint64
		for {
			page, err := c.MigrationEvents(ctx, &broker.MigrationEventsRequest{ID: id, After: after, Limit: 2})
			if err != nil {
				return nil, err
			}
			if len(page.Events) > 2 {
				t.Fatalf("page of %d events, want at most 2", len(page.Events))
			}
			all = append(all, page.Events...)
			after = page.Next
			if !page.More {
				return all, nil
			}
		}
	}
	phasesOf := func(evs []broker.StoredEvent) []broker.Phase {
		var out []broker.Phase
		for _, ev := range evs {
			if ev.Event.Kind == broker.EventPhase {
				out = append(out, ev.Event.Phase)
			}
		}
		return out
	}
	want := []broker.Phase{broker.PhaseRequested, broker.PhaseAttesting, broker.PhaseKeysReleased,
		broker.PhaseTransferring, broker.PhaseCuttingOver, broker.PhaseCommitted, broker.PhaseErased}
	// The Erased event is published after the record: read until the stream has it.
	var evs []broker.StoredEvent
	for deadline := time.Now().Add(10 * time.Second); ; {
		if evs, err = readAll(e.tenant(tenant)); err != nil {
			t.Fatal(err)
		}
		if got := phasesOf(evs); len(got) == len(want) || time.Now().After(deadline) {
			break
		}
		<-time.After(20 * time.Millisecond)
	}
	if diff := cmp.Diff(want, phasesOf(evs)); diff != "" {
		t.Errorf("phases (-want +got):\n%s", diff)
	}
	progress := 0
	for i, ev := range evs {
		if ev.Event.MigrationID != id {
			t.Errorf("event %d names migration %s, want %s", ev.Seq, ev.Event.MigrationID, id)
		}
		if i > 0 && ev.Seq <= evs[i-1].Seq {
			t.Errorf("sequence %d after %d", ev.Seq, evs[i-1].Seq)
		}
		if ev.Event.Kind == broker.EventProgress {
			progress++
		}
	}
	if progress == 0 {
		t.Error("no progress events")
	}
	byOperator, err := readAll(e.operator())
	if err != nil {
		t.Fatal(err)
	}
	if len(byOperator) < len(evs) {
		t.Errorf("operator read %d events, tenant %d", len(byOperator), len(evs))
	}
	// Each page's consumer is dropped by the server soon after: followers leave none behind.
	stream, err := e.jetstream().Stream(ctx, broker.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	consumers := stream.ListConsumers(ctx)
	for info := range consumers.Info() {
		if th := info.Config.InactiveThreshold; th == 0 || th > 5*time.Second {
			t.Errorf("consumer %s of %s kept for %s when idle", info.Name, broker.EventsStream, th)
		}
	}
	if err := consumers.Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.tenant("globex").MigrationEvents(ctx, &broker.MigrationEventsRequest{ID: id}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("another tenant reading the events: %v, want ErrNotFound", err)
	}
}

// TestPolicyGetAndHistory: a tenant reads the policy the broker holds and its revisions;
// a VM without its own policy gets the tenant-wide one; another tenant reads none of it.
func TestPolicyGetAndHistory(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.startBroker("b1")
	ctx := t.Context()
	acme := e.tenant(tenant)
	envelopes := [][]byte{[]byte(`{"fake":"policy-1"}`), []byte(`{"fake":"policy-2"}`)}
	for _, env := range envelopes {
		if _, err := acme.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Envelope: env}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := acme.GetPolicy(ctx, &broker.GetPolicyRequest{VM: vm})
	if err != nil {
		t.Fatal(err)
	}
	if got.Key != tenant || string(got.Envelope) != string(envelopes[1]) || got.Revision == 0 {
		t.Errorf("policy for %s = key %q revision %d envelope %s, want the tenant-wide second", vm, got.Key, got.Revision, got.Envelope)
	}
	hist, err := e.operator().PolicyHistory(ctx, &broker.PolicyHistoryRequest{Tenant: tenant})
	if err != nil {
		t.Fatal(err)
	}
	var gotEnvs []string
	for _, r := range hist.Revisions {
		gotEnvs = append(gotEnvs, string(r.Envelope))
	}
	if diff := cmp.Diff([]string{string(envelopes[0]), string(envelopes[1])}, gotEnvs); diff != "" {
		t.Errorf("history (-want +got):\n%s", diff)
	}
	globex := e.tenant("globex")
	if _, err := globex.GetPolicy(ctx, &broker.GetPolicyRequest{Tenant: tenant}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("another tenant's policy: %v, want ErrNotFound", err)
	}
	if _, err := globex.PolicyHistory(ctx, &broker.PolicyHistoryRequest{Tenant: tenant}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("another tenant's policy history: %v, want ErrNotFound", err)
	}
	if _, err := globex.GetPolicy(ctx, &broker.GetPolicyRequest{}); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("a tenant without a policy: %v, want ErrNotFound", err)
	}
}
