package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/agentapi/agentapitest"
)

// denyingKeyBroker is the fake keybroker that denies the release to some destinations.
type denyingKeyBroker struct {
	*brokertest.KeyBroker
	// deny maps a destination host to the reason of its denial.
	deny map[string]string
	// code is the denial's keybroker error code; empty means kbwire.CodeDenied.
	code wireerr.Code
	// onDeny runs before each denial is answered.
	onDeny func()
	denied atomic.Int32
}

func (k *denyingKeyBroker) Release(ctx context.Context, req *kbwire.ReleaseRequest) (*kbwire.ReleaseResponse, error) {
	reason, ok := k.deny[req.DestinationHost.Name]
	if !ok {
		return k.KeyBroker.Release(ctx, req)
	}
	k.denied.Add(1)
	if k.onDeny != nil {
		k.onDeny()
	}
	code := k.code
	if code == "" {
		code = kbwire.CodeDenied
	}
	return nil, fmt.Errorf("keybroker %w: %w", broker.ErrDenied, wireerr.New(code, reason))
}

// fallbackEnv starts a broker whose keybroker denies the destinations in deny, the guest's
// host h1 (committing at once) and hosts h2, h3 and h4.
func fallbackEnv(t *testing.T, deny map[string]string, configure func(*broker.Config, *denyingKeyBroker)) *env {
	t.Helper()
	e := newEnv(t, natstest.Options{})
	kb := &denyingKeyBroker{KeyBroker: e.kb, deny: deny}
	e.cfg.KeyBroker = kb
	if configure != nil {
		configure(&e.cfg, kb)
	}
	e.standard()
	e.agents["h1"].AutoCommit = true
	e.addAgent("h3", attest.PlatformEmulatedSEVSNP, "eu", nil)
	e.addAgent("h4", attest.PlatformEmulatedSEVSNP, "eu", nil)
	return e
}

// startMigration records a migration of the guest from h1 to destination with candidates, as
// the broker's placement would, and returns its id: the broker starts driving it.
func startMigration(t *testing.T, e *env, destination string, candidates ...string) string {
	t.Helper()
	ctx := t.Context()
	id := fmt.Sprintf("mig-fallback-%d", time.Now().UnixNano())
	guests := e.kv(broker.GuestsBucket)
	entry, err := guests.Get(ctx, broker.GuestKey(tenant, vm))
	if err != nil {
		t.Fatal(err)
	}
	var g broker.Guest
	if err := json.Unmarshal(entry.Value(), &g); err != nil {
		t.Fatal(err)
	}
	g.Migration = id
	data, err := json.Marshal(g)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := guests.Update(ctx, broker.GuestKey(tenant, vm), data, entry.Revision()); err != nil {
		t.Fatal(err)
	}
	now := e.clock.Now()
	m := broker.Migration{
		ID: id, Tenant: tenant, VM: vm, Source: g.Host, Destination: destination, Candidates: candidates,
		Platform: g.Platform, MemoryBytes: guestMiB << 20, Epoch: g.Epoch, Phase: broker.PhaseRequested,
		RequestedBy: "operator", Created: now, PhaseSince: now, Updated: now,
		Timeline: []broker.PhaseEntry{{Phase: broker.PhaseRequested, Entered: now}},
	}
	if data, err = json.Marshal(m); err != nil {
		t.Fatal(err)
	}
	if _, err := e.kv(broker.MigrationsBucket).Create(ctx, id, data); err != nil {
		t.Fatal(err)
	}
	return id
}

// attempts returns m's attempts without their times.
func attempts(m *broker.Migration) []broker.Attempt {
	out := make([]broker.Attempt, len(m.Attempts))
	for i, a := range m.Attempts {
		a.At = time.Time{}
		out[i] = a
	}
	return out
}

// checkDropped fails the test unless each of hosts was told to abort migration id, and the
// others were not.
func checkDropped(t *testing.T, e *env, id string, hosts ...string) {
	t.Helper()
	for _, h := range []string{"h2", "h3", "h4"} {
		_, _, aborted, _ := e.agents[h].State(id)
		want := false
		for _, d := range hosts {
			want = want || d == h
		}
		if aborted != want {
			t.Errorf("%s aborted = %v, want %v", h, aborted, want)
		}
	}
}

// auditMessages collects the messages of the audit events of all migrations; the function it
// returns waits (up to 10 s) until migration id has finished, its last phase event received
// after every audit event, and lists the messages of its audit events.
func auditMessages(t *testing.T, e *env) func(id string) []string {
	t.Helper()
	var mu sync.Mutex
	got := map[string][]string{}
	finished := map[string]chan struct{}{}
	done := func(id string) chan struct{} {
		if finished[id] == nil {
			finished[id] = make(chan struct{})
		}
		return finished[id]
	}
	nc := e.srv.Connect(t)
	_, err := nc.Subscribe(broker.EventsSubjectPrefix+".>", func(m *nats.Msg) {
		var ev broker.Event
		if json.Unmarshal(m.Data, &ev) != nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		switch {
		case ev.Kind == broker.EventAudit:
			got[ev.MigrationID] = append(got[ev.MigrationID], ev.Message)
		case ev.Kind == broker.EventPhase && ev.Phase.Terminal():
			close(done(ev.MigrationID))
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return func(id string) []string {
		mu.Lock()
		c := done(id)
		mu.Unlock()
		select {
		case <-c:
		case <-time.After(10 * time.Second):
			t.Fatalf("migration %s: no terminal phase event", id)
		}
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got[id])
	}
}

func TestDenialFallsBackToNextCandidate(t *testing.T) {
	e := fallbackEnv(t, map[string]string{"h2": "h2 microcode too old", "h3": "h3 not in region"}, nil)
	audit := auditMessages(t, e)
	id := startMigration(t, e, "h2", "h3", "h4")
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	want := []broker.Attempt{
		{Destination: "h2", Reason: "h2 microcode too old", Dropped: true},
		{Destination: "h3", Reason: "h3 not in region", Dropped: true},
	}
	if diff := cmp.Diff(want, attempts(m)); diff != "" {
		t.Errorf("attempts (-want +got):\n%s", diff)
	}
	if m.Destination != "h4" || len(m.Candidates) != 0 {
		t.Errorf("destination %s, candidates %v; want h4 and none", m.Destination, m.Candidates)
	}
	checkDropped(t, e, id, "h2", "h3")
	msgs := audit(id)
	for _, want := range []string{"release denied for h2: h2 microcode too old; trying h3", "release denied for h3: h3 not in region; trying h4"} {
		if !slices.Contains(msgs, want) {
			t.Errorf("audit events %q lack %q", msgs, want)
		}
	}
	guests, err := e.operator().ListGuests(t.Context(), &broker.ListGuestsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(guests.Guests) != 1 || guests.Guests[0].Host != "h4" || guests.Guests[0].Epoch != 2 {
		t.Errorf("guests = %+v, want the guest on h4 in epoch 2", guests.Guests)
	}
	// Each release named its own destination, under fresh nonces.
	rel := e.kb.Releases()
	if len(rel) != 1 || rel[0].DestinationHost.Name != "h4" {
		t.Errorf("allowed releases = %+v, want one to h4", rel)
	}
}

// TestRefusedPreparationFallsBack: a destination that will not prepare the guest (no room)
// costs an attempt, as a denial does, and the migration moves on to its next candidate.
func TestRefusedPreparationFallsBack(t *testing.T) {
	e := fallbackEnv(t, nil, nil)
	e.agents["h2"].RefusePrepare = fmt.Errorf("%w: a guest of 1 MiB does not fit on host h2", agentapi.ErrConflict)
	id := startMigration(t, e, "h2", "h3")
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased || m.Destination != "h3" {
		t.Fatalf("phase %s on %s (reason %q), want Erased on h3", m.Phase, m.Destination, m.AbortReason)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Destination != "h2" || !strings.Contains(m.Attempts[0].Reason, "does not fit") {
		t.Errorf("attempts %+v, want h2's refusal", m.Attempts)
	}
	if n := len(e.kb.Releases()); n != 1 {
		t.Errorf("%d releases, want one (to h3): a refused preparation is not sent to the keybroker", n)
	}
}

func TestDenialEverywhereAborts(t *testing.T) {
	e := fallbackEnv(t, map[string]string{"h2": "reason two", "h3": "reason three", "h4": "reason four"}, nil)
	id := startMigration(t, e, "h2", "h3", "h4")
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseAborted {
		t.Fatalf("phase = %s, want Aborted", m.Phase)
	}
	for _, r := range []string{"h2: reason two", "h3: reason three", "h4: reason four"} {
		if !strings.Contains(m.AbortReason, r) {
			t.Errorf("abort reason %q does not name %q", m.AbortReason, r)
		}
	}
	if len(m.Attempts) != 2 {
		t.Errorf("attempts = %+v, want h2 and h3 (h4 is the destination)", m.Attempts)
	}
	checkDropped(t, e, id, "h2", "h3", "h4")
	if _, _, _, resumed := e.agents["h1"].State(id); !resumed {
		t.Error("guest not resumed at the source")
	}
}

func TestDenialFallbackBounds(t *testing.T) {
	tests := map[string]struct {
		configure  func(*broker.Config, *denyingKeyBroker)
		candidates []string
		want       int // releases asked for
	}{
		"no candidates": {want: 1},
		"max attempts": {
			configure:  func(c *broker.Config, _ *denyingKeyBroker) { c.MaxAttempts = 2 },
			candidates: []string{"h3", "h4"},
			want:       2,
		},
		"policy rejected": {
			configure:  func(_ *broker.Config, k *denyingKeyBroker) { k.code = kbwire.CodePolicyRejected },
			candidates: []string{"h3", "h4"},
			want:       1,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var kb *denyingKeyBroker
			e := fallbackEnv(t, map[string]string{"h2": "no", "h3": "no", "h4": "no"}, func(c *broker.Config, k *denyingKeyBroker) {
				kb = k
				if tc.configure != nil {
					tc.configure(c, k)
				}
			})
			id := startMigration(t, e, "h2", tc.candidates...)
			m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
			if m.Phase != broker.PhaseAborted {
				t.Fatalf("phase = %s, want Aborted", m.Phase)
			}
			if got := int(kb.denied.Load()); got != tc.want {
				t.Errorf("releases asked for = %d, want %d", got, tc.want)
			}
			if len(m.Attempts) != tc.want-1 {
				t.Errorf("attempts = %+v, want %d", m.Attempts, tc.want-1)
			}
			if tc.want == 1 && (!strings.Contains(m.AbortReason, "no") || strings.Contains(m.AbortReason, "each of")) {
				t.Errorf("abort reason %q, want the one denial", m.AbortReason)
			}
			if n := e.agents["h4"].CallCount(agentapi.OpPrepare, id); n != 0 {
				t.Errorf("h4 prepared %d times, want never", n)
			}
		})
	}
}

// TestDenialRestartsStartTimeout: a fallback has the whole start timeout again, counted from
// its denial.
func TestDenialRestartsStartTimeout(t *testing.T) {
	var e *env
	e = fallbackEnv(t, map[string]string{"h2": "no"}, func(_ *broker.Config, k *denyingKeyBroker) {
		// The denial comes after the start timeout (120 s) from the request: the fallback is
		// within its own.
		k.onDeny = func() { e.clock.Advance(130 * time.Second) }
	})
	id := startMigration(t, e, "h2", "h3")
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased || m.Destination != "h3" {
		t.Fatalf("phase %s on %s (reason %q), want Erased on h3", m.Phase, m.Destination, m.AbortReason)
	}
}

// abortFails is a fake agent whose first aborts fail.
type abortFails struct {
	*agentapitest.Agent
	fail atomic.Int32
}

func (a *abortFails) Abort(ctx context.Context, req *agentapi.AbortRequest) (*agentapi.AbortResponse, error) {
	if a.fail.Add(-1) >= 0 {
		return nil, errors.New("agent busy")
	}
	return a.Agent.Abort(ctx, req)
}

// TestDeniedDestinationDroppedAtEnd: a denied destination that does not confirm it dropped its
// preparation is asked again when the migration ends.
func TestDeniedDestinationDroppedAtEnd(t *testing.T) {
	e := fallbackEnv(t, map[string]string{"h4b": "no"}, nil)
	// h4 serves through a handler whose first abort fails.
	a := agentapitest.New("h4", attest.PlatformEmulatedSEVSNP)
	a.Now = e.clock.Now
	h := &abortFails{Agent: a}
	h.fail.Store(1)
	nc := e.connect(natsauth.RoleAgent, "h4b")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stop, err := agentapi.Start(ctx, nc, "h4b", h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	rec := a.Record("eu", nil)
	rec.Host = "h4b"
	if err := agentapi.PutHost(ctx, nc, &rec); err != nil {
		t.Fatal(err)
	}
	id := startMigration(t, e, "h4b", "h3")
	m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased || m.Destination != "h3" {
		t.Fatalf("phase %s on %s (reason %q), want Erased on h3", m.Phase, m.Destination, m.AbortReason)
	}
	want := []broker.Attempt{{Destination: "h4b", Reason: "no", Dropped: true}}
	if diff := cmp.Diff(want, attempts(m), cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("attempts (-want +got):\n%s", diff)
	}
	if n := a.CallCount(agentapi.OpAbort, id); n != 1 {
		t.Errorf("aborts that reached h4b = %d, want 1 (the retry at the end)", n)
	}
	if _, _, aborted, _ := a.State(id); !aborted {
		t.Error("h4b never dropped its preparation")
	}
}
