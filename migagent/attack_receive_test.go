package migagent

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// TestReceptionRefusedAtOnceErases ends a reception the data plane refuses before it
// starts (here: the source's key in the grant does not parse), which erases nothing by
// itself. The agent must still destroy MDK_{e+1} and record the destination's erasure, so
// that the abort that follows answers from it instead of scrubbing the region the failed
// reception released (which panicked).
func TestReceptionRefusedAtOnceErases(t *testing.T) {
	kbPub, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-c", kbPub)
	nonce := make([]byte, 32)
	rand.Read(nonce)
	if _, err := n.Prepare(t.Context(), &agentapi.PrepareRequest{MigrationID: "m", Nonce: nonce, Tenant: "t", VM: "v", MemoryBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	m := n.migs["m"]
	n.mu.Unlock()
	tk, err := dataplane.NewSecretKey(make([]byte, dataplane.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	mdk, err := dataplane.NewSecretKey(make([]byte, dataplane.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	m.keys.recv = dataplane.Keys{TK: tk, MDK: mdk, Identity: m.keys.hpke, PeerKey: []byte("not a key")}
	m.state.Store(uint32(phaseReceiving))
	m.mu.Unlock()
	n.backend.receive(t.Context(), m)

	m.mu.Lock()
	p, erased := m.phase(), m.dstErasure != nil
	m.mu.Unlock()
	if p != phaseFailed || !erased || !mdk.Destroyed() || !tk.Destroyed() {
		t.Errorf("after the refused reception: phase %s, erasure recorded %v, MDK destroyed %v, TK destroyed %v", p, erased, mdk.Destroyed(), tk.Destroyed())
	}
	r, err := func() (r *agentapi.AbortResponse, err error) {
		defer func() {
			if v := recover(); v != nil {
				err = errors.New("abort panicked")
			}
		}()
		return n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m", Reason: "test"})
	}()
	if err != nil || len(r.Statement) == 0 {
		t.Fatalf("abort after the refused reception: %+v, %v", r, err)
	}
	if !m.keys.empty() {
		t.Error("keys left after the abort")
	}
}

// TestPrepareRefusesASecondArrivalOfTheSameGuest prepares two migrations bringing the same
// guest into the host. Were both to receive it, the second to commit would replace the
// first's guest in the node's map, whose MDK would then never be destroyed and whose
// workload would run on unseen. The second Prepare must be refused while the first may
// still receive; after the first ends without the guest, another may be prepared.
func TestPrepareRefusesASecondArrivalOfTheSameGuest(t *testing.T) {
	kbPub, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-c", kbPub)
	prepare := func(id string) error {
		nonce := make([]byte, 32)
		rand.Read(nonce)
		_, err := n.Prepare(t.Context(), &agentapi.PrepareRequest{MigrationID: id, Nonce: nonce, Tenant: "t", VM: "v", MemoryBytes: 1 << 20})
		return err
	}
	if err := prepare("m-1"); err != nil {
		t.Fatal(err)
	}
	if err := prepare("m-2"); !errors.Is(err, agentapi.ErrConflict) {
		t.Fatalf("a second arrival of the guest: %v, want a conflict", err)
	}
	if err := prepare("m-1"); err != nil {
		t.Fatalf("preparing the first again: %v", err)
	}
	if _, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m-1"}); err != nil {
		t.Fatal(err)
	}
	if err := prepare("m-2"); err != nil {
		t.Fatalf("an arrival after the first was aborted: %v", err)
	}
	n.mu.Lock()
	m := n.migs["m-2"]
	n.mu.Unlock()
	if _, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: m.id}); err != nil {
		t.Fatal(err)
	}
}
