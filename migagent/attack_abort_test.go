package migagent

import (
	"context"
	"errors"
	"log/slog"
	"sync"
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

// TestAbortActsOnThePhaseItChecked lets a Transfer take the migration's lock between the
// abort's look at the phase (keyed: nothing runs) and its acting on it. The abort must not
// act on a phase it did not check: here it would let the guest go (clearing its migration,
// so that another source migration of it could start) while its transfer runs, and then
// fail to enter aborted from sending. It must stop the transfer it finds and abort after it.
//
// The interleaving is forced with the mutex's starvation mode: once a waiter has waited
// more than a millisecond, an unlock hands the lock to the longest waiter, so the abort's
// first unlock hands it to the waiting Transfer.
func TestAbortActsOnThePhaseItChecked(t *testing.T) {
	n, m, g := keyedSource(t)
	m.mu.Lock()
	var (
		wg   sync.WaitGroup
		resp *agentapi.AbortResponse
		aerr error
	)
	wg.Go(func() { resp, aerr = n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: m.id, Reason: "test"}) })
	time.Sleep(20 * time.Millisecond) // the abort waits for m.mu
	wg.Go(func() {
		if _, err := n.Transfer(t.Context(), &agentapi.TransferRequest{MigrationID: m.id}, nil); err != nil && !errors.Is(err, agentapi.ErrConflict) {
			t.Errorf("transfer: %v", err)
		}
	})
	time.Sleep(20 * time.Millisecond) // the transfer waits behind it
	// Unlock and lock again at once: the woken abort finds the lock taken, has waited long
	// enough to starve, and puts the mutex in starvation mode.
	m.mu.Unlock()
	m.mu.Lock()
	time.Sleep(20 * time.Millisecond)
	m.mu.Unlock()
	wg.Wait()

	if aerr != nil {
		t.Fatalf("abort: %v", aerr)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase() != phaseAborted || !m.keys.empty() || resp.Unresolved {
		t.Errorf("after the abort: phase %s, keys held %v, answer %+v", m.phase(), !m.keys.empty(), resp)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if g.migration != "" {
		t.Errorf("the aborted migration still holds the guest")
	}
}
