package broker

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// defaultMaxKeyBrokerCalls is Config.MaxKeyBrokerCalls's default.
const defaultMaxKeyBrokerCalls = 32

// boundedKeyBroker lets at most cap(releases) key releases, and as many destructions, of one
// broker reach the keybrokers at once; the others wait here, where their time does not count
// against the call's deadline. Releases and destructions are bounded apart, so that slow
// destructions do not hold new migrations back, nor the other way round.
//
// Both write Vault a dozen times. When the keybrokers' Vault is slower than the broker asks
// (seen on the cluster at 200 migrations in flight, with other work on the machine), calls
// queued inside the keybrokers ran past the agent timeout, and each driver asked again a
// second later: the repeats, half of them reaching another keybroker that began the same
// destruction anew, added to the load that made them time out. Waiting for a slot in the
// broker keeps the keybrokers' queue short enough to answer within the timeout.
type boundedKeyBroker struct {
	KeyBroker
	releases, destroys chan struct{}
	// waiting counts the calls waiting for a slot.
	waiting atomic.Int32
}

func newBoundedKeyBroker(kb KeyBroker, n int) *boundedKeyBroker {
	return &boundedKeyBroker{KeyBroker: kb, releases: make(chan struct{}, n), destroys: make(chan struct{}, n)}
}

// acquire waits for a slot of slots, or for ctx to end; what names the call.
func (k *boundedKeyBroker) acquire(ctx context.Context, slots chan struct{}, what string) error {
	select {
	case slots <- struct{}{}:
		return nil
	default:
	}
	k.waiting.Add(1)
	defer k.waiting.Add(-1)
	select {
	case slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: waiting to call the keybroker's %s: %w", ErrUnavailable, what, ctx.Err())
	}
}

// Release implements KeyBroker within the bound.
func (k *boundedKeyBroker) Release(ctx context.Context, req *kbwire.ReleaseRequest) (*kbwire.ReleaseResponse, error) {
	if err := k.acquire(ctx, k.releases, "release"); err != nil {
		return nil, err
	}
	defer func() { <-k.releases }()
	return k.KeyBroker.Release(ctx, req)
}

// Destroy implements KeyBroker within the bound.
func (k *boundedKeyBroker) Destroy(ctx context.Context, req *kbwire.DestroyRequest) (*DestroyResponse, error) {
	if err := k.acquire(ctx, k.destroys, "destroy"); err != nil {
		return nil, err
	}
	defer func() { <-k.destroys }()
	return k.KeyBroker.Destroy(ctx, req)
}
