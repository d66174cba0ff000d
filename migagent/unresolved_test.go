package migagent

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"encoding/json"
	"log/slog"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// unresolvedNode is a node on a fresh emulated SEV-SNP platform that pins kb.
func unresolvedNode(t *testing.T, emuDir, host string, kb ed25519.PublicKey, guests ...GuestSpec) *Node {
	t.Helper()
	chip := sha512.Sum512([]byte(host))
	plat, err := emulate.Open(emuDir, attest.PlatformEmulatedSEVSNP, emulate.Options{ChipID: chip[:]})
	if err != nil {
		t.Fatal(err)
	}
	n, err := New(Config{
		Host: host, Conn: &nats.Conn{}, Attester: plat, KeybrokerKey: kb, Guests: guests, WorkloadRate: -1,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.closeGuests)
	return n
}

// TestUnresolvedSourceResumesOnlyOnProof: a source whose FIN went out but whose commit
// acknowledgement was lost (the network dropped it) cannot tell whether the destination
// resumed the guest. An abort on the broker's word alone must not resume it (the guest would
// then run in two places); only the keybroker's receipt decides: aborted resumes it,
// committed drops the source's copy.
func TestUnresolvedSourceResumesOnlyOnProof(t *testing.T) {
	kbPub, kbKey, _ := ed25519.GenerateKey(rand.Reader)
	const tenant, vm, size = "demo", "web", 1 << 20
	holds := func(n *Node) bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.guests[guestKey(tenant, vm)] != nil
	}
	// unresolved makes a source in the state a lost acknowledgement leaves: it attested,
	// sent its FIN, and keeps the guest paused.
	unresolved := func(t *testing.T, id string) *Node {
		a := unresolvedNode(t, t.TempDir(), "host-a", kbPub, GuestSpec{Tenant: tenant, VM: vm, MemoryBytes: size})
		nonce := make([]byte, 32)
		rand.Read(nonce)
		if _, err := a.Attest(t.Context(), &agentapi.AttestRequest{MigrationID: id, Role: attest.RoleSource, Nonce: nonce, Tenant: tenant, VM: vm}); err != nil {
			t.Fatal(err)
		}
		a.mu.Lock()
		m := a.migs[id]
		a.mu.Unlock()
		m.mu.Lock()
		m.keys.zeroize()
		m.state.Store(uint32(phaseInDoubt))
		m.progress = &agentapi.Progress{MigrationID: id, Phase: agentapi.TransferFailed}
		m.mu.Unlock()
		return a
	}

	t.Run("no proof, or forged proof: stays paused", func(t *testing.T) {
		a := unresolved(t, "m-1")
		forged := signedReceipt(t, "m-1", tenant, vm, receipt.OutcomeAborted, otherKey(t))
		other := signedReceipt(t, "m-2", tenant, vm, receipt.OutcomeAborted, kbKey)
		unverified := signedReceipt(t, "m-1", tenant, vm, receipt.OutcomeAbortedUnverifiedErasure, kbKey)
		for name, proof := range map[string]json.RawMessage{
			"no receipt": nil, "a receipt signed by another key": forged, "another migration's receipt": other,
			"an abort the destination did not prove": unverified,
		} {
			r, err := a.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m-1", Reason: "broker says so", Receipt: proof})
			if err != nil || !r.Unresolved || r.Resumed {
				t.Errorf("abort with %s: %+v, %v; want unresolved, not resumed", name, r, err)
			}
		}
		a.mu.Lock()
		stillUnknown := a.migs["m-1"].phase() == phaseInDoubt
		a.mu.Unlock()
		if !stillUnknown || !holds(a) {
			t.Errorf("after unproven aborts: unknown %v, guest held %v; want the guest kept, paused", stillUnknown, holds(a))
		}
	})
	t.Run("the keybroker's abort receipt resumes it", func(t *testing.T) {
		a := unresolved(t, "m-1")
		r, err := a.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m-1", Receipt: signedReceipt(t, "m-1", tenant, vm, receipt.OutcomeAborted, kbKey)})
		if err != nil || !r.Resumed || r.Unresolved {
			t.Fatalf("abort with the keybroker's receipt: %+v, %v; want resumed", r, err)
		}
	})
	t.Run("the keybroker's commit receipt drops the copy", func(t *testing.T) {
		a := unresolved(t, "m-1")
		r, err := a.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m-1", Receipt: signedReceipt(t, "m-1", tenant, vm, receipt.OutcomeCommittedUnverifiedErasure, kbKey)})
		if err != nil || !r.Committed || r.Resumed {
			t.Fatalf("source given the commit receipt: %+v, %v; want committed", r, err)
		}
		if holds(a) {
			t.Error("the source still holds the guest after the commit receipt")
		}
		nonce := make([]byte, 32)
		rand.Read(nonce)
		if _, err := a.Erase(t.Context(), &agentapi.EraseRequest{MigrationID: "m-1", Nonce: nonce}); err != nil {
			t.Errorf("the source's erasure evidence after the commit receipt: %v", err)
		}
	})
}

func otherKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// signedReceipt is a receipt of how migration id ended, signed by key.
func signedReceipt(t *testing.T, id, tenant, vm string, outcome receipt.Outcome, key ed25519.PrivateKey) json.RawMessage {
	t.Helper()
	r := &receipt.Receipt{
		Kind: receipt.Kind, MigrationID: id, Tenant: tenant, VM: vm, Outcome: outcome,
		DestroyedKeys: []receipt.DestroyedKey{{Name: "lethe-mig-" + id}},
	}
	env, err := receipt.Sign(r, key.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) { return ed25519.Sign(key, msg), nil })
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
