package broker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// markGrace is how long a guest's mark of a migration that has no record yet is taken for one
// being created (createMigration marks the guest, then records the migration, milliseconds
// apart); an older mark whose migration is nowhere is stale.
const markGrace = time.Minute

// forgetGuest drops the broker's record of a guest whose VM is gone for good (deleted, or its
// host decommissioned), so that it is no longer listed nor migrated and the broker would take
// the name in afresh. A tenant forgets its own guests only (another tenant's is not found); an
// operator any guest.
//
// It refuses, with ErrConflict, while a migration of the guest is in flight (naming it and how
// to abort it), and with ErrFailedPrecondition while the guest's host is live and still
// reports the guest: a running guest is not forgotten, since nothing could then migrate it nor
// give its host's agent its key again. The record is deleted by compare-and-swap, so that a
// migration requested meanwhile either finds no guest or makes the forget fail.
//
// The keybroker is not told: the guest's current epoch key stays in Vault, and the keybroker
// still holds the guest as adopted (it refuses to adopt the name again), because its residency
// log has no entry that records a guest's keys destroyed outside a migration (docs/log.md).
// The forget is one audit record (AuditGuestForget) with the caller's reason.
func (b *Broker) forgetGuest(ctx context.Context, c Caller, req *ForgetGuestRequest) (*Guest, error) {
	tenant, err := c.tenantFor(req.Tenant)
	if err != nil {
		return nil, err
	}
	if err := validVM(req.VM); err != nil {
		return nil, err
	}
	if len(req.Reason) > maxReason {
		return nil, fmt.Errorf("%w: reason longer than %d bytes", ErrInvalid, maxReason)
	}
	key := GuestKey(tenant, req.VM)
	for {
		g, rev, err := getJSON[Guest](ctx, b.store.guests, key)
		if errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("%w: guest %s is not adopted", ErrNotFound, key)
		}
		if err != nil {
			return nil, err
		}
		if err := b.forgettable(ctx, g); err != nil {
			return nil, err
		}
		dctx, cancel := context.WithTimeout(ctx, storeCallTimeout)
		err = b.store.guests.Delete(dctx, key, jetstream.LastRevision(rev))
		cancel()
		if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue // it changed (a migration requested or ended): look again
		}
		if err != nil {
			return nil, fmt.Errorf("deleting %s %q: %w", b.store.guests.Bucket(), key, storeError(err))
		}
		b.log.Info("Guest forgotten", logKeyTenant, tenant, logKeyVM, req.VM, logKeyHost, g.Host, logKeyEpoch, g.Epoch,
			"by", c.String(), logKeyReason, req.Reason)
		b.publishAudit(AuditRecord{Action: AuditGuestForget, By: c.String(), Target: key, Reason: req.Reason,
			Tenant: tenant, VM: req.VM, Host: g.Host,
			Detail: fmt.Sprintf("epoch %d; its key stays in the keybroker", g.Epoch)})
		g.WrappedMDK = ""
		return g, nil
	}
}

// forgettable returns why g may not be forgotten now, or nil.
func (b *Broker) forgettable(ctx context.Context, g *Guest) error {
	key := GuestKey(g.Tenant, g.VM)
	if g.Migration != "" {
		m, _, err := b.findMigration(ctx, g.Migration)
		switch {
		case err == nil && !m.Phase.Terminal():
			return fmt.Errorf("%w: guest %s is migrating (%s, %s → %s, %s): wait for it to end, or abort it with `lethectl migrations abort %s`",
				ErrConflict, key, m.ID, m.Source, m.Destination, m.Phase, m.ID)
		case errors.Is(err, ErrNotFound) && b.now().Sub(g.Updated) < markGrace:
			return fmt.Errorf("%w: guest %s is being marked for migration %s: try again", ErrConflict, key, g.Migration)
		case err != nil && !errors.Is(err, ErrNotFound):
			return err
		}
		// An ended or long-missing migration left the guest marked: the mark holds nothing.
	}
	host, _, err := getJSON[agentapi.HostRecord](ctx, b.store.hosts, g.Host)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil
	case err != nil:
		return err
	}
	if live, _ := b.fresh(host, b.now()); live && host.Guest(g.Tenant, g.VM) != nil {
		return fmt.Errorf("%w: host %s is live and still runs guest %s: forget is for a guest whose VM is gone; delete the VM first, or migrate it",
			ErrFailedPrecondition, g.Host, key)
	}
	return nil
}
