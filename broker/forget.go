package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// markGrace is how long a guest's mark of a migration that has no record yet is taken for one
// being created (createMigration marks the guest, then records the migration, milliseconds
// apart); an older mark whose migration is nowhere is stale.
const markGrace = time.Minute

// forgetGuest forgets a guest whose VM is gone for good (deleted, or its host
// decommissioned): the keybroker destroys its key, and the broker drops its record, so that it
// is no longer listed nor migrated and the name can be adopted again. A tenant forgets its own
// guests only (another tenant's is not found); an operator any guest.
//
// It refuses, with ErrConflict, while a migration of the guest is in flight (naming it and how
// to abort it), and with ErrFailedPrecondition while the guest's host is live and still
// reports the guest: a running guest is not forgotten, since nothing could then migrate it nor
// give its host's agent its key again. The record is deleted by compare-and-swap, so that a
// migration requested meanwhile either finds no guest or makes the forget fail (after the
// keybroker's part: that migration is then refused its keys and aborts, and a forget asked
// again drops the record).
//
// Once its own checks pass, it asks the keybroker (guest.forget) with req.Signed, the
// statement the caller signed with its tenant's policy key or the operator's admin key: the
// broker is not trusted with the guest's key, and cannot forge that statement. Only once the
// keybroker destroyed the key (or holds no such guest: a forget interrupted before the
// broker's record went) is the record deleted; a refusal deletes nothing (ErrDenied for a
// statement the keybroker does not accept, ErrConflict while a migration holds keys,
// ErrInvalid for a malformed one, ErrUnavailable). The forget is one audit record
// (AuditGuestForget) with the caller's reason.
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
	if len(req.Signed) == 0 {
		return nil, fmt.Errorf("%w: a forget needs a statement signed with the tenant's policy key or the admin key (lethectl guests forget signs it)", ErrInvalid)
	}
	key := GuestKey(tenant, req.VM)
	var detail string // what the keybroker did, once it did
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
		if detail == "" {
			if detail, err = b.forgetKeys(ctx, tenant, req); err != nil {
				b.log.Warn("Forget refused by the keybroker", logKeyTenant, tenant, logKeyVM, req.VM, "by", c.String(), logKeyError, err)
				return nil, err
			}
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
			Detail: fmt.Sprintf("epoch %d; %s", g.Epoch, detail)})
		g.WrappedMDK = ""
		return g, nil
	}
}

// forgetKeys asks the keybroker to forget the guest on req's signed statement, and returns
// what it did, for the audit record. A guest the keybroker does not hold (forgotten there
// already) is no refusal.
func (b *Broker) forgetKeys(ctx context.Context, tenant string, req *ForgetGuestRequest) (string, error) {
	resp, err := b.kb.Forget(ctx, &kbwire.ForgetRequest{Tenant: tenant, VM: req.VM, Signed: req.Signed})
	switch {
	case err == nil:
		return fmt.Sprintf("the keybroker destroyed %s (%s, signed by the %s)", strings.Join(resp.DestroyedKeys, ", "), resp.ForgetID, resp.By), nil
	case errors.Is(err, kbwire.CodeNotAdopted):
		return "the keybroker held no key of it", nil
	case errors.Is(err, kbwire.CodeUnauthorized):
		return "", fmt.Errorf("%w: the keybroker refused the forget's statement: %w", ErrDenied, err)
	case errors.Is(err, kbwire.CodeGuestBusy):
		return "", fmt.Errorf("%w: %w", ErrConflict, err)
	case errors.Is(err, kbwire.CodeInvalidRequest):
		return "", fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return "", fmt.Errorf("forgetting the guest's key: %w", err)
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
