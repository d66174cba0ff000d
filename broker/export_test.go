package broker

import "context"

// Reconcile runs one check, as the broker does every CheckInterval.
func (b *Broker) Reconcile(ctx context.Context) { b.reconcile(ctx) }
