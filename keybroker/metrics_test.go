package keybroker

import (
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// decision is one Metrics.Decided call.
type decision struct {
	Kind     EventKind
	Decision Decision
	Reason   string
}

// recordingMetrics is a Metrics that records what it is given.
type recordingMetrics struct {
	mu          sync.Mutex
	decisions   []decision
	releases    []Decision
	vaultErrors int
}

func (r *recordingMetrics) Decided(kind EventKind, d Decision, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.decisions = append(r.decisions, decision{kind, d, reason})
}

func (r *recordingMetrics) Released(d Decision, _ time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.releases = append(r.releases, d)
}

func (r *recordingMetrics) VaultError() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.vaultErrors++
}

// take returns what was recorded since the last call and forgets it.
func (r *recordingMetrics) take() ([]decision, []Decision, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, rel, v := r.decisions, r.releases, r.vaultErrors
	r.decisions, r.releases, r.vaultErrors = nil, nil, 0
	return d, rel, v
}

func TestMetricsOfReleases(t *testing.T) {
	rec := &recordingMetrics{}
	e := newEnv(t, func(c *Config) { c.Metrics = rec })
	e.adopt("vm1")
	e.adopt("vm2")
	rec.take()

	tests := []struct {
		name          string
		run           func(t *testing.T) error
		wantDecisions []decision
		wantReleases  []Decision
		wantVault     bool
	}{
		{
			name: "denied by policy",
			run: func(t *testing.T) error {
				_, err := e.kb.Release(t.Context(), e.newMigration("m1", "vm1", "weak", e.signedPolicy(1, nil)).req)
				return err
			},
			wantDecisions: []decision{{EventRelease, DecisionDeny, "denied"}},
			wantReleases:  []Decision{DecisionDeny},
		},
		{
			name: "replayed nonce",
			run: func(t *testing.T) error {
				m := e.newMigration("m2", "vm1", "destination", e.signedPolicy(1, nil))
				m.req.Source.Nonce = append([]byte(nil), m.req.Destination.Nonce...)
				_, err := e.kb.Release(t.Context(), m.req)
				return err
			},
			wantDecisions: []decision{{EventRelease, DecisionDeny, "nonce_unknown"}},
			wantReleases:  []Decision{DecisionDeny},
		},
		{
			name: "allowed",
			run: func(t *testing.T) error {
				_, err := e.kb.Release(t.Context(), e.newMigration("m4", "vm2", "destination", e.signedPolicy(1, nil)).req)
				return err
			},
			wantDecisions: []decision{{EventRelease, DecisionAllow, ""}},
			wantReleases:  []Decision{DecisionAllow},
		},
		// Last: the keybroker's background work (the residency log's checkpoints) may meet
		// the cut Vault too, and count its error after the case has ended.
		{
			name: "vault down",
			run: func(t *testing.T) error {
				m := e.newMigration("m3", "vm1", "destination", e.signedPolicy(1, nil))
				e.proxy.Cut()
				defer e.proxy.Restore()
				_, err := e.kb.Release(t.Context(), m.req)
				return err
			},
			wantDecisions: []decision{{EventRelease, DecisionError, "unavailable"}},
			wantReleases:  []Decision{DecisionError},
			wantVault:     true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(t)
			if (err == nil) != (tc.wantDecisions[0].Decision == DecisionAllow) {
				t.Fatalf("Release: %v", err)
			}
			d, rel, vault := rec.take()
			if diff := cmp.Diff(tc.wantDecisions, d); diff != "" {
				t.Errorf("decisions (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantReleases, rel); diff != "" {
				t.Errorf("release latencies (-want +got):\n%s", diff)
			}
			if (vault > 0) != tc.wantVault {
				t.Errorf("%d Vault errors counted, want some: %v", vault, tc.wantVault)
			}
		})
	}
}

func TestPendingDestructions(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), m.req); err != nil {
		t.Fatal(err)
	}
	if n := e.kb.PendingDestructions(); n != 0 {
		t.Fatalf("backlog = %d before any destruction", n)
	}
	// Vault goes away once the abort is journaled (the migration ID is checked first): while
	// the keys are destroyed.
	req := e.abort("m1", "vm1")
	e.proxy.Block(func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/transit/keys/") })
	_, err := e.kb.Destroy(t.Context(), req)
	e.proxy.Restore()
	if !errors.Is(err, ErrDestructionPending) {
		t.Fatalf("Destroy with Vault down = %v, want ErrDestructionPending", err)
	}
	if n := e.kb.PendingDestructions(); n != 1 {
		t.Errorf("backlog = %d, want 1", n)
	}
}
