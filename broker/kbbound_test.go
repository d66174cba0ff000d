package broker_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// slowDestroys is a keybroker whose destructions each hold until let go, counting how many
// are held at once.
type slowDestroys struct {
	*brokertest.KeyBroker
	mu         sync.Mutex
	held, most int
	arrived    chan struct{}
	let        chan struct{}
}

func (k *slowDestroys) Destroy(ctx context.Context, req *kbwire.DestroyRequest) (*broker.DestroyResponse, error) {
	k.mu.Lock()
	k.held++
	k.most = max(k.most, k.held)
	k.mu.Unlock()
	defer func() {
		k.mu.Lock()
		k.held--
		k.mu.Unlock()
	}()
	k.arrived <- struct{}{}
	select {
	case <-k.let:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %w", broker.ErrUnavailable, ctx.Err())
	}
	return k.KeyBroker.Destroy(ctx, req)
}

// TestKeyBrokerCallsAreBounded: six migrations commit at once through a broker that asks the
// keybrokers at most two destructions at a time, while the keybroker holds every destruction
// it gets. It gets two; the four others wait in the broker, not in a call that could time
// out, and once the keybroker answers all six end erased.
func TestKeyBrokerCallsAreBounded(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	kb := &slowDestroys{KeyBroker: e.kb, arrived: make(chan struct{}, 16), let: make(chan struct{})}
	e.cfg.KeyBroker = kb
	e.cfg.MaxKeyBrokerCalls = 2
	e.cfg.TenantShare = 1
	b1, _ := e.startBroker("b1")
	guests := guestsOf(6)
	src := e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	src.AutoCommit = true
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	var ids []string
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
		resp := e.migrateTo(g.VM, "h2")
		ids = append(ids, resp.Migration.ID)
	}
	// Two destructions reach the keybroker and are held there; the four others wait in the
	// broker.
	<-kb.arrived
	<-kb.arrived
	for deadline := time.Now().Add(30 * time.Second); b1.KeyBrokerCallsWaiting() < 4; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d keybroker calls wait in the broker, want the 4 destructions beyond the bound", b1.KeyBrokerCallsWaiting())
		}
	}
	close(kb.let)
	for _, id := range ids {
		if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
			t.Errorf("migration %s: %s (%q), want Erased", id, m.Phase, m.AbortReason)
		}
	}
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if kb.most != 2 {
		t.Errorf("the keybroker held %d destructions at once, want 2", kb.most)
	}
}
