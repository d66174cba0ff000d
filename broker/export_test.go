package broker

import "context"

// Reconcile runs one check, as the broker does every CheckInterval.
func (b *Broker) Reconcile(ctx context.Context) { b.reconcile(ctx) }

// Asleep reports whether the driver of migration id waits for admission asleep, with no
// wake-up pending, and the migrations watch has delivered the bucket's revision rev.
func (b *Broker) Asleep(id string, rev uint64) bool {
	b.mu.Lock()
	pending := len(b.driving[id]) > 0
	b.mu.Unlock()
	b.waitingMu.Lock()
	defer b.waitingMu.Unlock()
	return b.waiting[id].asleep && !pending && b.watched.Load() >= rev
}

// KeyBrokerCallsWaiting returns how many keybroker calls wait for a slot.
func (b *Broker) KeyBrokerCallsWaiting() int {
	return int(b.kb.(*boundedKeyBroker).waiting.Load())
}
