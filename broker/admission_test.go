package broker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"
)

// limitHost states in host's record that its agent takes limit migrations at once.
func (e *env) limitHost(host string, limit int, guests ...agentapi.HostGuest) {
	e.t.Helper()
	rec := e.agents[host].Record("eu", nil, guests...)
	rec.MaxMigrations = limit
	if err := agentapi.PutHost(context.Background(), e.connect(natsauth.RoleAgent, host), &rec); err != nil {
		e.t.Fatal(err)
	}
}

// guestsOf returns n guests of tenant, vm-0 to vm-<n-1>.
func guestsOf(n int) []agentapi.HostGuest {
	guests := make([]agentapi.HostGuest, n)
	for i := range guests {
		guests[i] = agentapi.HostGuest{Tenant: tenant, VM: fmt.Sprint("vm-", i), MemoryBytes: guestMiB << 20}
	}
	return guests
}

// migrateTo asks, as tenant, for the migration of its guest vm to host dst.
func (e *env) migrateTo(vm, dst string) *broker.CreateMigrationResponse {
	e.t.Helper()
	resp, err := e.tenant(tenant).CreateMigration(context.Background(), &broker.CreateMigrationRequest{VM: vm, Destination: dst})
	if err != nil {
		e.t.Fatal(err)
	}
	return resp
}

// TestMigrationsBeyondAHostsLimitWaitAndProceed: four migrations to a destination whose agent
// takes two at once. Two are admitted; the others wait in Requested, saying for what, past
// the start timeout, and are admitted as the first ones end. None aborts, and the
// destination is never asked to prepare more than two at once.
func TestMigrationsBeyondAHostsLimitWaitAndProceed(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.MaxMigrationsPerHost = 10
	// One tenant: the host's limit, not the tenant's share, is under test.
	e.cfg.TenantShare = 1
	e.startBroker("b1")
	guests := guestsOf(4)
	src := e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	dst := e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	e.limitHost("h2", 2)
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
	}

	var ids []string
	for _, g := range guests {
		resp := e.migrateTo(g.VM, "h2")
		ids = append(ids, resp.Migration.ID)
	}
	admittedOrWaiting := func(m *broker.Migration) bool {
		return m.Phase == broker.PhaseTransferring && m.Progress != nil || m.Phase == broker.PhaseRequested && m.Waiting != "" || m.Phase.Terminal()
	}
	var running, waiting []string
	for _, id := range ids {
		switch m := e.waitMigration(id, admittedOrWaiting); m.Phase {
		case broker.PhaseTransferring:
			running = append(running, id)
		case broker.PhaseRequested:
			if want := "waiting: host h2 has 2 migrations in flight"; !strings.HasPrefix(m.Waiting, want) {
				t.Errorf("migration %s waits %q, want it to say %q", id, m.Waiting, want)
			}
			waiting = append(waiting, id)
		default:
			t.Fatalf("migration %s ended %s (%q) while others were in flight", id, m.Phase, m.AbortReason)
		}
	}
	if len(running) != 2 || len(waiting) != 2 {
		t.Fatalf("%d migrations admitted and %d waiting, want 2 and 2", len(running), len(waiting))
	}
	for _, id := range waiting {
		if n := dst.CallCount(agentapi.OpPrepare, id); n != 0 {
			t.Errorf("the destination was asked to prepare waiting migration %s %d times", id, n)
		}
	}
	got, err := e.tenant(tenant).GetMigration(t.Context(), waiting[0])
	if err != nil {
		t.Fatal(err)
	}
	if got.Waiting == "" {
		t.Error("a tenant reading a waiting migration is not told what it waits for")
	}

	// Waiting is not starting: the start timeout counts from the admission.
	e.clock.Advance(130 * time.Second)
	for _, id := range running {
		if err := src.Commit(id); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range waiting {
		m := e.waitMigration(id, func(m *broker.Migration) bool {
			return m.Phase == broker.PhaseTransferring && m.Progress != nil || m.Phase == broker.PhaseAborting || m.Phase == broker.PhaseAborted
		})
		if m.Phase != broker.PhaseTransferring {
			t.Fatalf("waiting migration %s: %s (%q), want it admitted once the others ended", id, m.Phase, m.AbortReason)
		}
		if m.Waiting != "" || m.Admitted.IsZero() {
			t.Errorf("admitted migration %s: waiting %q, admitted at %v", id, m.Waiting, m.Admitted)
		}
		if err := src.Commit(id); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range ids {
		if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
			t.Errorf("migration %s: %s (%q), want Erased", id, m.Phase, m.AbortReason)
		}
	}
}

// TestAWaitingMigrationAbortsOnTheQueueTimeout: a migration that waits for admission longer
// than the queue timeout is aborted, and its reason says it was never admitted and why.
func TestAWaitingMigrationAbortsOnTheQueueTimeout(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.MaxMigrationsPerHost = 1
	// One tenant: the host's limit, not the tenant's share, is under test.
	e.cfg.TenantShare = 1
	e.startBroker("b1")
	guests := guestsOf(2)
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	var ids []string
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
		resp := e.migrateTo(g.VM, "h2")
		ids = append(ids, resp.Migration.ID)
		e.waitMigration(resp.Migration.ID, func(m *broker.Migration) bool {
			return m.Phase == broker.PhaseTransferring && m.Progress != nil || m.Waiting != ""
		})
	}
	e.clock.Advance(31 * time.Minute)
	m := e.waitMigration(ids[1], inPhase(broker.PhaseAborted))
	if want := "timeout: not admitted within 30m0s (waiting: host h1 has 1 migrations in flight"; !strings.HasPrefix(m.AbortReason, want) {
		t.Errorf("abort reason %q, want it to start %q", m.AbortReason, want)
	}
}

// TestTwoBrokersAdmitNoMoreThanAHostsLimit: migrations requested of two brokers at once, to a
// destination that takes two: the brokers serialize on the host's places, so that the
// migrations bucket never holds more than two admitted and unfinished at once, and all of
// them end erased.
func TestTwoBrokersAdmitNoMoreThanAHostsLimit(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.MaxMigrationsPerHost = 2
	// One tenant: the host's limit, not the tenant's share, is under test.
	e.cfg.TenantShare = 1
	e.startBroker("b1")
	e.startBroker("b2")
	guests := guestsOf(6)
	src := e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	src.AutoCommit = true
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
	}

	w, err := e.kv(broker.MigrationsBucket).WatchAll(t.Context(), jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	most := make(chan int, 1)
	go func() {
		phases, peak := map[string]broker.Phase{}, 0
		for entry := range w.Updates() {
			var m broker.Migration
			if entry == nil || entry.Operation() != jetstream.KeyValuePut || json.Unmarshal(entry.Value(), &m) != nil {
				continue
			}
			phases[m.ID] = m.Phase
			admitted := 0
			for _, p := range phases {
				if p != broker.PhaseRequested && !p.Terminal() {
					admitted++
				}
			}
			peak = max(peak, admitted)
			select {
			case <-most:
			default:
			}
			most <- peak
		}
	}()

	ids := make([]string, len(guests))
	var g errgroup.Group
	for i, guest := range guests {
		g.Go(func() error {
			resp, err := e.tenant(tenant).CreateMigration(context.Background(), &broker.CreateMigrationRequest{VM: guest.VM, Destination: "h2"})
			if err == nil {
				ids[i] = resp.Migration.ID
			}
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
			t.Errorf("migration %s: %s (%q), want Erased", id, m.Phase, m.AbortReason)
		}
	}
	if peak := <-most; peak > 2 {
		t.Errorf("%d migrations admitted at once to a host that takes 2", peak)
	}
}

// TestAPlaceGivenBackElsewhereWakesAWaitingMigration: a place given back by another broker
// (here, the test writing the places record as one would) lets in the migration that waits
// for it at once, through the watch of the places; the waiting broker's own checks are an
// hour apart, so nothing else would.
func TestAPlaceGivenBackElsewhereWakesAWaitingMigration(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.MaxMigrationsPerHost = 1
	e.cfg.TenantShare = 1
	e.cfg.CheckInterval, e.cfg.Lease = time.Hour, time.Hour
	b1, _ := e.startBroker("b1")
	guests := guestsOf(2)
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	var ids []string
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
		resp := e.migrateTo(g.VM, "h2")
		ids = append(ids, resp.Migration.ID)
		e.waitMigration(resp.Migration.ID, func(m *broker.Migration) bool {
			return m.Phase == broker.PhaseTransferring && m.Progress != nil || m.Waiting != ""
		})
	}
	// The waiting driver's own writes wake it through the migrations watch: the places are
	// given back only once it sleeps after the last of them.
	last, err := e.kv(broker.MigrationsBucket).Get(t.Context(), ids[1])
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !b1.Asleep(ids[1], last.Revision()); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the waiting migration's driver never slept")
		}
		if last, err = e.kv(broker.MigrationsBucket).Get(t.Context(), ids[1]); err != nil {
			t.Fatal(err)
		}
	}
	fleet := e.kv(broker.FleetBucket)
	for _, host := range []string{"h1", "h2"} {
		entry, err := fleet.Get(t.Context(), "slot."+host)
		if err != nil {
			t.Fatal(err)
		}
		var places struct {
			Host       string            `json:"host"`
			Migrations map[string]any    `json:"migrations"`
			Tenants    map[string]string `json:"tenants"`
		}
		if err := json.Unmarshal(entry.Value(), &places); err != nil {
			t.Fatal(err)
		}
		if _, ok := places.Migrations[ids[0]]; !ok {
			t.Fatalf("host %s's places %s do not hold the admitted migration", host, entry.Value())
		}
		delete(places.Migrations, ids[0])
		delete(places.Tenants, ids[0])
		data, _ := json.Marshal(places)
		if _, err := fleet.Update(t.Context(), "slot."+host, data, entry.Revision()); err != nil {
			t.Fatal(err)
		}
	}
	m := e.waitMigration(ids[1], func(m *broker.Migration) bool { return m.Phase != broker.PhaseRequested })
	if m.Phase != broker.PhaseAttesting && m.Phase != broker.PhaseKeysReleased && m.Phase != broker.PhaseTransferring {
		t.Errorf("waiting migration %s (%q) once its places were given back, want it admitted", m.Phase, m.AbortReason)
	}
}
