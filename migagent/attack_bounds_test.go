package migagent

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// TestABrokerCannotGrowTheAgentWithoutBound plays a broker that attests and prepares without
// end: the agent refuses migrations beyond its bound in flight and attestations beyond its
// bound per migration, and forgets the oldest ended migrations to make room for new ones.
func TestABrokerCannotGrowTheAgentWithoutBound(t *testing.T) {
	live, kept, atts := defaultMaxLive, maxKept, maxAttestations
	defaultMaxLive, maxKept, maxAttestations = 3, 5, 2
	t.Cleanup(func() { defaultMaxLive, maxKept, maxAttestations = live, kept, atts })

	kb, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-a", kb, GuestSpec{Tenant: "demo", VM: "web", MemoryBytes: 1 << 20})
	attestAdopt := func(id string) error {
		// A new nonce each time: the same one would be the same attempt, answered again.
		nonce := make([]byte, 32)
		rand.Read(nonce)
		_, err := n.Attest(t.Context(), &agentapi.AttestRequest{MigrationID: id, Role: attest.RoleAdopt, Nonce: nonce, Tenant: "demo", VM: "web"})
		return err
	}

	for i := range 3 {
		if err := attestAdopt(fmt.Sprint("a-", i)); err != nil {
			t.Fatalf("adoption %d: %v", i, err)
		}
	}
	if err := attestAdopt("a-3"); !errors.Is(err, agentapi.ErrConflict) {
		t.Fatalf("a fourth migration in flight: %v, want a conflict", err)
	}
	if err := attestAdopt("a-0"); err != nil {
		t.Fatalf("attesting a-0 again: %v", err)
	}
	if err := attestAdopt("a-0"); !errors.Is(err, agentapi.ErrConflict) {
		t.Fatalf("a third attestation of a-0: %v, want a conflict", err)
	}

	// Ended migrations make room, and the oldest ended ones are forgotten beyond maxKept.
	for i := range 3 {
		if _, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: fmt.Sprint("a-", i), Reason: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 3; i < 6; i++ {
		if err := attestAdopt(fmt.Sprint("a-", i)); err != nil {
			t.Fatalf("adoption %d after the others ended: %v", i, err)
		}
	}
	n.mu.Lock()
	_, first := n.migs["a-0"]
	_, second := n.migs["a-1"]
	size := len(n.migs)
	n.mu.Unlock()
	if first || !second || size != maxKept {
		t.Errorf("after 6 migrations with room for %d: a-0 kept %v, a-1 kept %v, %d kept; want the oldest ended one forgotten", maxKept, first, second, size)
	}
}
