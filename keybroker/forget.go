package keybroker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// Forget forgets a guest whose VM is gone for good: it destroys the key of its live epoch,
// appends a forget entry to the residency log, and releases the guest's record, so that a
// guest of that name may be adopted again (into a new epoch 1). Nothing is released.
//
// The broker carries the request but is not trusted with the guest's keys, so it cannot ask
// on its own: req.Signed must be a statement for kbwire.OpGuestForget whose
// ForgetGuestRequest names req's guest, signed either by the guest's tenant's policy key (a
// TenantStatement) or by Config.AdminKey (an AdminStatement), unexpired, valid for at most
// kbwire.MaxAdminValidity, and never used before (its ID is spent, as RegisterTenant's is).
//
// It refuses while a migration of the guest holds keys (released, or being released or
// destroyed): the migration must be committed or aborted first; and while a reissue of the
// guest's key holds it (reissueMarker), whose log entry must come first. The destruction is
// journaled like a migration's (Run retries it if Vault fails half-way). Every call is audited
// (EventForget): a refusal by Forget, the forget itself once the guest's record is released
// (by Run's retry, for one that was pending).
//
// It returns ErrInvalidRequest (a malformed request or statement, one naming another guest),
// ErrUnauthorized (no valid signature of the tenant or the admin, a statement for another
// operation, expired, too long-lived or replayed), ErrUnknownTenant, ErrNotAdopted, ErrGuestBusy
// (a migration holds keys, a reissue holds the guest, or the record changed meanwhile),
// ErrDestructionPending (journaled; Vault failed, the forget completes later) or
// ErrVaultUnavailable (nothing was destroyed).
func (k *Keybroker) Forget(ctx context.Context, req *kbwire.ForgetRequest) (*kbwire.ForgetResponse, error) {
	ev := Event{Kind: EventForget, Tenant: req.Tenant, VM: req.VM}
	resp, err := k.forget(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("forgetting %s/%s: %w", req.Tenant, req.VM, err)
		if !errors.Is(err, ErrDestructionPending) {
			k.emit(ctx, &ev, err)
		}
	}
	return resp, err
}

func (k *Keybroker) forget(ctx context.Context, req *kbwire.ForgetRequest, ev *Event) (*kbwire.ForgetResponse, error) {
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	st, fr, by, err := k.verifyForget(ctx, req)
	if err != nil {
		return nil, err
	}
	ev.By, ev.Reason = by, fr.Reason
	id := forgetID(st)
	ev.MigrationID = id
	var g guestRecord
	ver, err := k.recs.get(ctx, guestPath(req.Tenant, req.VM), &g)
	if err != nil {
		return nil, err
	}
	if err := forgettable(req.Tenant, req.VM, ver, &g, k.now()); err != nil {
		return nil, err
	}
	// Spent only now, so that a statement refused for the guest's state is not lost; a
	// statement used concurrently loses here.
	if err := k.spendStatement(ctx, st); err != nil {
		return nil, err
	}
	digest := sha256.Sum256(req.Signed)
	e := &journalEntry{
		Kind: kindForget, MigrationID: id, Tenant: req.Tenant, VM: req.VM, Epoch: g.Epoch,
		Statement: digest[:], Signer: by, Reason: fr.Reason, RequestedAt: k.now().UTC(),
	}
	ev.Epoch = g.Epoch
	if err := k.jnl.add(e); err != nil {
		return nil, err
	}
	if err := k.attempt(ctx, e); err != nil {
		if errors.Is(err, ErrVaultUnavailable) || errors.Is(err, errConflict) {
			return nil, fmt.Errorf("%w (journaled; retried until it completes): %w", ErrDestructionPending, err)
		}
		return nil, err
	}
	resp := &kbwire.ForgetResponse{Tenant: req.Tenant, VM: req.VM, ForgetID: id, Epoch: e.Epoch, By: by}
	for _, d := range e.Destroyed {
		resp.DestroyedKeys = append(resp.DestroyedKeys, d.Name)
	}
	return resp, nil
}

// forgetEvent is the audit event of a journaled forget.
func forgetEvent(e *journalEntry) *Event {
	ev := &Event{Kind: EventForget, MigrationID: e.MigrationID, Tenant: e.Tenant, VM: e.VM, Epoch: e.Epoch, By: e.Signer, Reason: e.Reason}
	for _, d := range e.Destroyed {
		ev.Keys = append(ev.Keys, d.Name)
	}
	return ev
}

// The signers of a forget's statement, as ForgetResponse.By and the audit event name them.
const (
	byAdmin  = "admin"
	byTenant = "tenant"
)

// verifyForget verifies a forget's statement, without spending it: an AdminStatement under
// Config.AdminKey, or a TenantStatement under the policy key of the tenant its request names;
// for OpGuestForget, current, and naming req's guest. It returns the statement, its request
// and who signed it, or ErrUnauthorized, ErrInvalidRequest, ErrUnknownTenant or
// ErrVaultUnavailable.
func (k *Keybroker) verifyForget(ctx context.Context, req *kbwire.ForgetRequest) (*kbwire.AdminStatement, *kbwire.ForgetGuestRequest, string, error) {
	typ, err := kbwire.StatementType(req.Signed)
	if err != nil {
		return nil, nil, "", fmt.Errorf("%w: %w", ErrUnauthorized, err)
	}
	var (
		st *kbwire.AdminStatement
		fr kbwire.ForgetGuestRequest
		by string
	)
	switch typ {
	case kbwire.AdminPayloadType:
		if st, err = k.verifyAdmin(req.Signed, kbwire.OpGuestForget); err != nil {
			return nil, nil, "", err
		}
		if err := st.DecodeRequest(&fr); err != nil {
			return nil, nil, "", fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
		by = byAdmin
	case kbwire.TenantPayloadType:
		env, tst, err := kbwire.ParseTenant(req.Signed)
		if err != nil {
			return nil, nil, "", fmt.Errorf("%w: %w", ErrUnauthorized, err)
		}
		if err := tst.DecodeRequest(&fr); err != nil {
			return nil, nil, "", fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
		// The key is that of the tenant the signed request names, which must be the guest's
		// (checked below): a statement of one tenant never forgets another's guest.
		if err := checkTenant(fr.Tenant); err != nil {
			return nil, nil, "", err
		}
		rec, _, err := k.loadTenant(ctx, fr.Tenant)
		if err != nil {
			return nil, nil, "", err
		}
		if _, err := env.Verify(kbwire.TenantPayloadType, rec.PolicyKey); err != nil {
			return nil, nil, "", fmt.Errorf("the statement is not signed by %s's policy key: %w", fr.Tenant, ErrUnauthorized)
		}
		if err := k.checkStatement(tst, kbwire.OpGuestForget); err != nil {
			return nil, nil, "", err
		}
		st, by = tst, byTenant
	default:
		return nil, nil, "", fmt.Errorf("statement of type %q, neither an admin's nor a tenant's: %w", typ, ErrUnauthorized)
	}
	if fr.Tenant != req.Tenant || fr.VM != req.VM {
		return nil, nil, "", fmt.Errorf("the signed statement forgets %s/%s, not %s/%s: %w", fr.Tenant, fr.VM, req.Tenant, req.VM, ErrInvalidRequest)
	}
	return st, &fr, by, nil
}

// forgetID names the forget of statement st: its log entry's migrationId and its journal
// entry. It is derived from the statement's ID, which is spent, so it is never reused.
func forgetID(st *kbwire.AdminStatement) string {
	d := sha256.Sum256([]byte(st.ID))
	return "forget-" + hex.EncodeToString(d[:12])
}

// forgettable returns why the guest, whose record (version ver) is g, may not be forgotten
// at now, or nil: it must be adopted, with no reissue holding it and no migration holding its
// keys.
func forgettable(tenant, vm string, ver int, g *guestRecord, now time.Time) error {
	m := g.Migration
	switch {
	case ver == 0 || g.Epoch == 0:
		return fmt.Errorf("%s/%s: %w", tenant, vm, ErrNotAdopted)
	case g.Reissuing.holds(now):
		return fmt.Errorf("reissue %s of %s/%s's key holds it until its entry is logged: try again in a moment: %w", g.Reissuing.ID, tenant, vm, ErrGuestBusy)
	case m == nil:
		return nil
	case m.State == stateReleasing || m.State == stateReleased:
		return fmt.Errorf("migration %s of %s/%s holds released keys (%s): commit or abort it first: %w", m.ID, tenant, vm, m.State, ErrGuestBusy)
	}
	return fmt.Errorf("%s/%s has migration %s %s, whose keys are being destroyed: try again once it ends: %w", tenant, vm, m.ID, m.State, ErrGuestBusy)
}

// executeForget holds the guest (stateForgetting, so that no release, reissue nor adoption
// uses it meanwhile; never while a reissue holds it, see reissueMarker), destroys its live
// epoch's key, logs the forget and releases the guest's record (epoch 0, its last migration
// the forget). Every step is idempotent, so a retry picks up where the last attempt stopped.
// A guest that changed before it was held is not touched: the entry is dropped with
// ErrGuestBusy or ErrNotAdopted.
func (k *Keybroker) executeForget(ctx context.Context, e *journalEntry) error {
	path := guestPath(e.Tenant, e.VM)
	var g guestRecord
	ver, err := k.recs.get(ctx, path, &g)
	if err != nil {
		return err
	}
	switch m := g.Migration; {
	case m != nil && m.ID == e.MigrationID && m.State == stateForgetting:
		// Held by an earlier attempt.
	case ver != 0 && m == nil && g.Epoch == 0 && g.LastMigration == e.MigrationID:
		return nil // completed by an earlier attempt
	case ver != 0 && g.Epoch != e.Epoch:
		return fmt.Errorf("%s/%s moved from epoch %d to %d: %w", e.Tenant, e.VM, e.Epoch, g.Epoch, ErrGuestBusy)
	default:
		if err := forgettable(e.Tenant, e.VM, ver, &g, k.now()); err != nil {
			return err
		}
		g.Migration = &migrationRecord{ID: e.MigrationID, State: stateForgetting, FromEpoch: g.Epoch}
		g.Reissuing = nil // lapsed
		if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
			if errors.Is(err, errConflict) {
				// Not retried: the guest changed (a release or a reissue began) before it was
				// held.
				return fmt.Errorf("%s/%s changed while being forgotten: %w", e.Tenant, e.VM, ErrGuestBusy)
			}
			return err
		}
	}
	keys := []string{epochKeyName(e.Tenant, e.VM, e.Epoch)}
	if err := k.destroyKeys(ctx, e, keys); err != nil {
		return err
	}
	entry := &tlog.Entry{
		Kind: tlog.KindForget, Tenant: e.Tenant, VM: e.VM, MigrationID: e.MigrationID,
		FromEpoch: e.Epoch, ToEpoch: 0, Statement: e.Statement, DestroyedKeys: keys,
	}
	if _, err := k.logDecision(ctx, entry, true); err != nil {
		return err
	}
	if _, err := k.recs.put(ctx, path, &guestRecord{LastMigration: e.MigrationID}, ver); err != nil {
		return err
	}
	k.log.InfoContext(ctx, "Guest forgotten", attrTenant, e.Tenant, attrVM, e.VM, attrMigration, e.MigrationID, attrKeys, keys)
	k.emit(ctx, forgetEvent(e), nil)
	return nil
}
