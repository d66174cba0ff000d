package migagent

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

var allPhases = []phase{
	phaseAttested, phasePrepared, phaseKeyed, phaseSending, phaseReceiving,
	phaseFailed, phaseInDoubt, phaseCommitted, phaseAdopted, phaseAborted,
}

// keyedMigration returns a migration in phase p holding every kind of key, and the keys.
func keyedMigration(t *testing.T, p phase) (*migration, *seal.PrivateKey, []*dataplane.SecretKey) {
	t.Helper()
	hpke, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	var sk []*dataplane.SecretKey
	for range 3 {
		k, err := dataplane.NewSecretKey(make([]byte, 32))
		if err != nil {
			t.Fatal(err)
		}
		sk = append(sk, k)
	}
	m := newMigration("m", attest.RoleSource, "t", "v", 4096, p)
	m.keys = secrets{hpke: hpke, tk: sk[0], recv: dataplane.Keys{TK: sk[1], MDK: sk[2], Identity: hpke}}
	return m, hpke, sk
}

// TestTransitions tries every change of phase: the table's are taken, every other one is
// refused and changes nothing, and entering a phase that holds no key leaves none: the HPKE
// key zeroized, TK and MDK destroyed.
func TestTransitions(t *testing.T) {
	for _, from := range allPhases {
		for _, to := range allPhases {
			t.Run(from.String()+"→"+to.String(), func(t *testing.T) {
				m, hpke, sk := keyedMigration(t, from)
				m.mu.Lock()
				defer m.mu.Unlock()
				err := m.enter(to)
				allowed := slices.Contains(transitions[from], to)
				wiped := hpke.Zeroized() && sk[0].Destroyed() && sk[1].Destroyed() && sk[2].Destroyed() && m.keys.empty()
				switch {
				case allowed && err != nil:
					t.Fatalf("enter refused a change the table allows: %v", err)
				case !allowed && !errors.As(err, new(errPhase)):
					t.Fatalf("enter took a change the table does not allow (error %v)", err)
				case !allowed && (m.phase() != from || wiped || hpke.Zeroized()):
					t.Fatalf("a refused change moved the migration to %s or wiped its keys", m.phase())
				case allowed && m.phase() != to:
					t.Fatalf("migration in %s after entering %s", m.phase(), to)
				case allowed && !to.holdsKeys() && !wiped:
					t.Fatalf("entering %s left keys", to)
				case allowed && to.holdsKeys() && hpke.Zeroized():
					t.Fatalf("entering %s wiped the HPKE key it needs", to)
				}
			})
		}
	}
}

// TestTransitionTable checks the properties of the table that the agent's security rests on.
func TestTransitionTable(t *testing.T) {
	for _, p := range allPhases {
		if _, ok := transitions[p]; !ok {
			t.Errorf("phase %s has no row in the table", p)
		}
		if strings.HasPrefix(p.String(), "phase(") {
			t.Errorf("phase %d has no name", p)
		}
	}
	for _, p := range []phase{phaseCommitted, phaseAborted} {
		if len(transitions[p]) != 0 {
			t.Errorf("%s is final, yet the table leaves it for %v", p, transitions[p])
		}
	}
	never := []struct {
		from, to phase
		why      string
	}{
		{phaseSending, phaseAborted, "an abort stops the transfer first; the transfer's end decides between failed, in-doubt and committed"},
		{phaseReceiving, phaseAborted, "an abort stops the reception first: it may have resumed the guest"},
		{phaseInDoubt, phaseFailed, "a source in doubt may resume its guest only on the keybroker's receipt"},
		{phaseKeyed, phaseAttested, "keys opened for one HPKE key: attesting again would only break the handshake"},
		{phaseFailed, phaseSending, "a failed transfer does not restart: its keys are gone"},
		{phaseReceiving, phasePrepared, "a destination that took keys does not prepare again"},
	}
	for _, n := range never {
		if slices.Contains(transitions[n.from], n.to) {
			t.Errorf("the table allows %s → %s: %s", n.from, n.to, n.why)
		}
	}
	// Every phase reaches a final one: no migration is stuck holding keys.
	for _, p := range allPhases {
		seen := map[phase]bool{}
		var reach func(phase) bool
		reach = func(q phase) bool {
			if q == phaseCommitted || q == phaseAborted {
				return true
			}
			if seen[q] {
				return false
			}
			seen[q] = true
			return slices.ContainsFunc(transitions[q], reach)
		}
		if !reach(p) {
			t.Errorf("no path from %s to committed or aborted", p)
		}
	}
}

// TestAbortGivesUpWithItsContext shows that an abort waiting for a task that does not stop
// returns ctx's error when ctx ends, and leaves the migration as it was.
func TestAbortGivesUpWithItsContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := &Node{log: slog.New(slog.DiscardHandler), cfg: Config{Metrics: noMetrics{}}}
		m, _, _ := keyedMigration(t, phaseSending)
		stuck := make(chan struct{})
		m.cancel, m.done = func() {}, stuck // a task that ignores its cancellation
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		start := time.Now()
		_, err := n.abort(ctx, m, "test", nil)
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) != 30*time.Second {
			t.Fatalf("abort returned %v after %v, want the deadline after 30s", err, time.Since(start))
		}
		if m.phase() != phaseSending || m.keys.empty() {
			t.Fatalf("after the abort gave up: phase %s, keys held %v", m.phase(), !m.keys.empty())
		}
		close(stuck)
	})
}

// TestAbortAfterTaskEnds shows an abort of a running transfer waiting for the transfer to
// end: the transfer's own outcome (here: failed, guest running again) is what the abort
// answers from.
func TestAbortAfterTaskEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := &Node{log: slog.New(slog.DiscardHandler), cfg: Config{Metrics: noMetrics{}}, guests: map[string]*guest{}}
		g := &guest{tenant: "t", vm: "v", migration: "m"}
		n.guests[g.key()] = g
		m, hpke, _ := keyedMigration(t, phaseSending)
		m.g = g
		done := make(chan struct{})
		m.cancel = func() {
			go func() { // the transfer sees the cancellation after a while, then fails
				time.Sleep(time.Second)
				m.mu.Lock()
				if err := m.enter(phaseFailed); err != nil {
					t.Error(err)
				}
				m.mu.Unlock()
				close(done)
			}()
		}
		m.done = done
		r, err := n.abort(t.Context(), m, "test", nil)
		if err != nil || !r.Resumed || len(r.Statement) == 0 {
			t.Fatalf("abort: %+v, %v", r, err)
		}
		if m.phase() != phaseAborted || !m.keys.empty() || !hpke.Zeroized() || g.migration != "" {
			t.Fatalf("after the abort: phase %s, keys held %v, guest in migration %q", m.phase(), !m.keys.empty(), g.migration)
		}
		again, err := n.abort(t.Context(), m, "again", nil)
		if err != nil || again.Resumed != r.Resumed || string(again.Statement) != string(r.Statement) {
			t.Fatalf("a repeated abort answered %+v, %v; want %+v", again, err, r)
		}
	})
}

func TestParseMemAvailable(t *testing.T) {
	got, err := parseMemAvailable([]byte("MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"))
	if err != nil || got != 20000000<<10 {
		t.Errorf("parseMemAvailable = %d, %v; want %d", got, err, uint64(20000000)<<10)
	}
	for _, bad := range []string{"MemTotal: 1 kB\n", "MemAvailable: lots kB\n", "MemAvailable: 12 MB\n"} {
		if _, err := parseMemAvailable([]byte(bad)); err == nil {
			t.Errorf("parseMemAvailable(%q) succeeded", bad)
		}
	}
}

// TestPrepareRefusesAGuestLargerThanTheHostsMemory shows a destination refusing, before it
// maps anything, a guest that cannot fit in the memory available.
func TestPrepareRefusesAGuestLargerThanTheHostsMemory(t *testing.T) {
	avail, err := MemAvailable()
	if err != nil {
		t.Fatal(err) // the agent runs on Linux, which always has /proc/meminfo
	}
	n := &Node{cfg: Config{Host: "h"}}
	size := (avail/dataplane.PageSize + 1) * dataplane.PageSize * 2
	_, err = memoryBackend{n}.newDestination(&agentapi.PrepareRequest{MigrationID: "m", Tenant: "t", VM: "v", MemoryBytes: size})
	if !errors.Is(err, agentapi.ErrConflict) || !strings.Contains(err.Error(), "does not fit") {
		t.Fatalf("preparing %d bytes with %d available: %v, want a conflict saying it does not fit", size, avail, err)
	}
}
