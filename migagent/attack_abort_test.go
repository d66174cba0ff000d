package migagent

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// taskBackend is a backend whose transfers run until they are cancelled and then fail, as
// the data plane's do when cancelled before the FIN, or until commit is closed and then
// commit, destroying TK and MDK as the data plane does.
type taskBackend struct {
	n      *Node
	commit chan struct{}
}

func (taskBackend) newDestination(*agentapi.PrepareRequest) (*migration, error) {
	return nil, errors.New("no destinations")
}

func (b taskBackend) sender(m *migration, _ *agentapi.TransferRequest, keys dataplane.Keys, report agentapi.ProgressFunc) (func(context.Context), error) {
	return func(ctx context.Context) {
		select {
		case <-ctx.Done():
			keys.TK.Destroy()
			b.n.sent(m, sendOutcome{progress: agentapi.Progress{MigrationID: m.id}, err: ctx.Err()}, report, nil)
		case <-b.commit:
			keys.TK.Destroy()
			keys.MDK.Destroy()
			b.n.sent(m, sendOutcome{progress: agentapi.Progress{MigrationID: m.id}, commit: &dataplane.Commit{MigrationID: m.id, MAC: []byte{1}}}, report, nil)
		}
	}, nil
}

func (taskBackend) receive(context.Context, *migration)                       {}
func (taskBackend) resume(context.Context, *migration) error                  { return nil }
func (taskBackend) discard(context.Context, *guest, *attest.ErasureStatement) {}

// keyedSource returns a node with one guest and a source migration of it in phase keyed,
// whose transfers run on taskBackend.
func keyedSource(t *testing.T) (*Node, *migration, *guest) {
	t.Helper()
	n := &Node{
		log: slog.New(slog.DiscardHandler), cfg: Config{Metrics: noMetrics{}, Now: time.Now},
		guests: map[string]*guest{}, migs: map[string]*migration{}, life: t.Context(),
	}
	n.backend = taskBackend{n, make(chan struct{})}
	g := &guest{tenant: "t", vm: "v", memory: 1 << 20, migration: "m"}
	n.guests[g.key()] = g
	hpke, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	peer, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	tk, err := dataplane.NewSecretKey(make([]byte, dataplane.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	m := newMigration("m", attest.RoleSource, "t", "v", 1<<20, phaseKeyed)
	m.g, m.keys = g, secrets{hpke: hpke, tk: tk}
	m.grant = &grant.Grant{DataEndpoint: "127.0.0.1:1", Destination: &grant.End{HPKEPublicKey: peer.PublicKey()}}
	n.migs[m.id] = m
	t.Cleanup(func() { n.tasks.Wait() })
	return n, m, g
}

// TestAbortActsOnThePhaseItChecked: an abort acts only on the phase it checked under the
// lock it still holds, in whichever order it and a Transfer of the same migration take the
// migration's lock. Transfer first: the abort finds the transfer running, stops it and aborts
// after it ended. Abort first: the migration is aborted and the Transfer refused. Either way
// the guest is let go only once nothing runs, and no key is left. (Before, an abort let go of
// the lock between its look at the phase and its acting on it: a Transfer in that gap left
// the guest released while its transfer ran, and the abort failing to leave sending.)
func TestAbortActsOnThePhaseItChecked(t *testing.T) {
	abort := func(t *testing.T, n *Node, m *migration) {
		t.Helper()
		resp, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: m.id, Reason: "test"})
		if err != nil || resp.Unresolved {
			t.Fatalf("abort: %+v, %v", resp, err)
		}
	}
	transfer := func(n *Node, m *migration) error {
		_, err := n.Transfer(t.Context(), &agentapi.TransferRequest{MigrationID: m.id}, nil)
		return err
	}
	for name, run := range map[string]func(t *testing.T, n *Node, m *migration){
		"transfer first": func(t *testing.T, n *Node, m *migration) {
			if err := transfer(n, m); err != nil {
				t.Fatalf("transfer: %v", err)
			}
			if p := m.phase(); p != phaseSending {
				t.Fatalf("after the transfer started: phase %s", p)
			}
			abort(t, n, m)
		},
		"abort first": func(t *testing.T, n *Node, m *migration) {
			abort(t, n, m)
			if err := transfer(n, m); !errors.Is(err, agentapi.ErrConflict) {
				t.Fatalf("transfer after the abort: %v, want a conflict", err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			n, m, g := keyedSource(t)
			run(t, n, m)
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.phase() != phaseAborted || !m.keys.empty() {
				t.Errorf("after the abort: phase %s, keys held %v", m.phase(), !m.keys.empty())
			}
			n.mu.Lock()
			defer n.mu.Unlock()
			if g.migration != "" {
				t.Errorf("the aborted migration still holds the guest")
			}
		})
	}
}
