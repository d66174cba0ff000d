package migagent

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// release seals a source's keys to the HPKE key of evidence ev, bound to nonce, and returns
// the delivery with the keybroker's grant, signed by kb.
func release(t *testing.T, kb ed25519.PrivateKey, id, host string, ev *attest.Evidence, nonce []byte) *agentapi.KeysRequest {
	t.Helper()
	sealed, err := seal.Seal(ev.HPKEPublicKey, id, attest.RoleSource, &seal.Keys{TK: make([]byte, dataplane.KeySize)})
	if err != nil {
		t.Fatal(err)
	}
	dstKey, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	g := &grant.Grant{
		Kind: grant.Kind, Op: grant.OpRelease, MigrationID: id, Tenant: "t", VM: "v", FromEpoch: 1, ToEpoch: 2,
		Source:       grant.NewEnd(host, ev, nonce, sealed),
		Destination:  &grant.End{Host: "host-b", HPKEPublicKey: dstKey.PublicKey(), Nonce: []byte("dst")},
		DataEndpoint: "127.0.0.1:1",
	}
	env, err := grant.Sign(g, kb.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) { return ed25519.Sign(kb, msg), nil })
	if err != nil {
		t.Fatal(err)
	}
	return &agentapi.KeysRequest{MigrationID: id, Role: attest.RoleSource, SealedKeys: sealed, Grant: env}
}

// TestAttestAgain repeats a source's Attest as a broker retrying does: after a timeout (the
// same nonce) or a takeover or a stale read of its record (a new nonce). The same nonce must
// answer the same evidence; a new one a new key; and the keys the keybroker sealed to the
// first attempt, which a broker may have stored before it retried, must still open, after
// which every other attempt's key is zeroized.
func TestAttestAgain(t *testing.T) {
	kbPub, kbKey, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-a", kbPub, GuestSpec{Tenant: "t", VM: "v", MemoryBytes: 1 << 20})
	attestWith := func(nonce []byte) *attest.Evidence {
		t.Helper()
		ev, err := n.Attest(t.Context(), &agentapi.AttestRequest{MigrationID: "m", Role: attest.RoleSource, Nonce: nonce, Tenant: "t", VM: "v"})
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	first, second := []byte("nonce-1"), []byte("nonce-2")
	ev1 := attestWith(first)
	if again := attestWith(first); again.Digest() != ev1.Digest() {
		t.Error("attesting again with the same nonce answered other evidence")
	}
	ev2 := attestWith(second)
	if bytes.Equal(ev2.HPKEPublicKey, ev1.HPKEPublicKey) {
		t.Error("attesting with a new nonce kept the key of the first attempt")
	}
	if again := attestWith(first); again.Digest() != ev1.Digest() {
		t.Error("attesting again with the first nonce, after another, answered other evidence")
	}

	n.mu.Lock()
	m := n.migs["m"]
	n.mu.Unlock()
	m.mu.Lock()
	secondKey := m.keys.hpke
	m.mu.Unlock()

	// The grant must name the key with its own nonce: the first key under the second
	// attempt's nonce opens nothing.
	mixed := release(t, kbKey, "m", "host-a", ev1, second)
	if err := n.Keys(t.Context(), mixed); !errors.Is(err, agentapi.ErrBadRequest) {
		t.Errorf("keys sealed to the first key under the second nonce: %v, want refused", err)
	}
	if err := n.Keys(t.Context(), release(t, kbKey, "m", "host-a", ev1, first)); err != nil {
		t.Fatalf("keys sealed to the first attempt, after a second: %v", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase() != phaseKeyed {
		t.Errorf("after the keys: phase %s, want keyed", m.phase())
	}
	if !bytes.Equal(m.keys.hpke.PublicKey(), ev1.HPKEPublicKey) {
		t.Error("the migration holds another key than the one its keys were sealed to")
	}
	if !secondKey.Zeroized() || len(m.keys.earlier) != 0 {
		t.Error("the second attempt's key was kept after the keys opened")
	}
}

// TestPrepareAgain repeats a destination's Prepare: the same nonce must answer the same
// evidence, another a new key, with the earlier attempt's key kept until keys are opened.
func TestPrepareAgain(t *testing.T) {
	kbPub, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-b", kbPub)
	prepare := func(nonce string) *attest.Evidence {
		t.Helper()
		r, err := n.Prepare(t.Context(), &agentapi.PrepareRequest{MigrationID: "m", Nonce: []byte(nonce), Tenant: "t", VM: "v", MemoryBytes: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		return r.Evidence
	}
	ev1 := prepare("nonce-1")
	if again := prepare("nonce-1"); again.Digest() != ev1.Digest() {
		t.Error("preparing again with the same nonce answered other evidence")
	}
	ev2 := prepare("nonce-2")
	if bytes.Equal(ev2.HPKEPublicKey, ev1.HPKEPublicKey) {
		t.Error("preparing with a new nonce kept the key of the first attempt")
	}
	n.mu.Lock()
	m := n.migs["m"]
	n.mu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.keys.earlier) != 1 || !bytes.Equal(m.keys.earlier[0].key.PublicKey(), ev1.HPKEPublicKey) {
		t.Error("the first attempt's key was not kept beside the second's")
	}
}
