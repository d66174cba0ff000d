package migagent

import (
	"errors"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// TestAdoptionKeysWaitForTheGuestsMigration delivers a guest's memory data key again (an
// adoption or reissue, with the keybroker's grant) while a source migration of the guest
// transfers it. Taking it would destroy the MDK the transfer holds and leave the new one
// with the guest, which the transfer's commit then drops without destroying: the MDK of a
// residency that ended kept in memory. The keys must be refused while the guest migrates,
// and after the commit no MDK the guest held may be left.
func TestAdoptionKeysWaitForTheGuestsMigration(t *testing.T) {
	n, m, g := keyedSource(t)
	mdk, err := dataplane.NewSecretKey(make([]byte, dataplane.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	g.mdk, g.epoch = mdk, 1
	if _, err := n.Transfer(t.Context(), &agentapi.TransferRequest{MigrationID: m.id}, nil); err != nil {
		t.Fatal(err)
	}

	hpke, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	a := newMigration("a", attest.RoleAdopt, g.tenant, g.vm, g.memoryBytes(), phaseAttested)
	a.g, a.keys.hpke = g, hpke
	n.mu.Lock()
	n.migs[a.id] = a
	n.mu.Unlock()
	a.mu.Lock()
	err = n.takeKeys(a, &seal.Keys{MDK: make([]byte, dataplane.KeySize), Epoch: 1}, nil)
	a.mu.Unlock()
	if !errors.Is(err, agentapi.ErrConflict) {
		t.Errorf("adoption keys during the guest's migration: %v, want a conflict", err)
	}
	n.mu.Lock()
	held := g.mdk
	n.mu.Unlock()
	if held != mdk || mdk.Destroyed() {
		t.Errorf("the adoption replaced or destroyed the MDK the transfer holds")
	}

	close(n.backend.(taskBackend).commit)
	n.tasks.Wait()
	if m.phase() != phaseCommitted {
		t.Fatalf("the transfer ended in %s", m.phase())
	}
	if !mdk.Destroyed() || (held != nil && !held.Destroyed()) {
		t.Errorf("an MDK of the residency that ended was left undestroyed")
	}
}
