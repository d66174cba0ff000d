package keybroker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/policy"
)

// snapshotCaveat is stated in every receipt.
const snapshotCaveat = "Vault snapshots or backups taken while a destroyed key existed still hold it; the operator must handle them"

// receiptRecord is a signed receipt, in KV at receipts/<migration-id>.
type receiptRecord struct {
	Envelope *receipt.Envelope `json:"envelope"`
}

// Destroy ends a migration: on commit it moves the guest to epoch e+1 and destroys the
// migration key and the epoch-e key; on abort it destroys the migration key and the
// epoch-(e+1) key. Then it signs and stores the receipt and returns it.
//
// The migration ID must be the guest's: the first request that names an ID (its release, or
// Destroy) binds it to its guest for good, and a request naming another guest's ID is refused
// before any key, guest record or receipt is looked at.
//
// A commit must be proven before the source's keys go (DESIGN.md, "Roles and trust"). It
// carries the destination's commit acknowledgement (package grant), whose MAC the keybroker
// checks under the migration's transfer key, unwrapped from Vault for the purpose and wiped
// after; and the source's erasure evidence (role erased), which must verify, be bound to this
// migration, come from the released source (same platform, measurement, and chip ID or FMSPC:
// receipt.EndClaims.SameEnd) and satisfy the tenant's policy. The receipt then says erased.
// When the source is lost for good the caller sets UnverifiedErasure: a commit whose
// acknowledgement verifies but that has no erasure evidence, or evidence the tenant's policy
// does not accept, then goes ahead, and its receipt says committed-unverified-erasure and what
// was not proven. Erasure evidence from another end (another chip, another guest image) is
// refused even then: a lost source sends no evidence, and evidence from elsewhere is an attack.
//
// All of this is checked before the destruction is journaled. Once journaled, if Vault cannot
// be reached, the destruction stays journaled, Run retries it until it completes, and Destroy
// returns ErrDestructionPending (AwaitReceipt waits for the receipt). A repeated request with
// the same ending is idempotent: it returns the stored receipt, or completes the destruction
// already under way, without looking at its acknowledgement or evidence again (the migration
// key they would be checked with may be gone).
//
// An abort of a migration the keybroker never released, for an adopted guest with no other
// migration in progress, is recorded, destroys whatever keys of that migration's names exist
// (a release still in flight loses its reservation and cleans up after itself) and is answered
// with an abort receipt, so that every abort ends with one.
//
// Every refusal is audited with its reason. Destroy returns ErrInvalidRequest (a malformed
// request, proof sent with an abort, or a migration ID that belongs to another guest);
// ErrUnproven (no commit acknowledgement or one that does not verify; no erasure evidence, or
// evidence the policy does not accept, without UnverifiedErasure); ErrNonceUnknown,
// ErrNonceExpired, ErrNonceUsed or ErrEvidenceRejected for erasure evidence (that does not
// verify, names another migration, or comes from another end than the released source: the
// message names the claim that differs); ErrUnknownMigration; ErrBothEpochs (the migration
// already ended, or is ending, the other way); ErrGuestBusy (its records changed
// concurrently, or a commit waits for a reissue of the epoch it ends to be logged; a
// journaled destruction is retried); ErrDestructionPending; or an error
// wrapping ErrVaultUnavailable when Vault could not be reached before anything was journaled
// (nothing was destroyed; ask again).
func (k *Keybroker) Destroy(ctx context.Context, req *kbwire.DestroyRequest) (*kbwire.DestroyResponse, error) {
	ev := Event{Kind: EventDestroy, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM}
	span := k.cfg.Tracer.Start(ctx, req.MigrationID, "keybroker."+string(req.Ending))
	env, err := k.destroy(ctx, req, &ev)
	span.End(spanError(err))
	if err != nil {
		err = fmt.Errorf("destroying keys of migration %s: %w", req.MigrationID, err)
		if !errors.Is(err, ErrDestructionPending) {
			k.emit(ctx, &ev, err)
		}
		return nil, err
	}
	resp := &kbwire.DestroyResponse{Receipt: env}
	resp.Log = k.ReceiptInclusion(ctx, env)
	return resp, nil
}

// ReceiptInclusion proves that the log entry of a receipt's ending is in the residency log,
// or returns nil (and logs why) if the log cannot answer now: the receipt stands without it,
// and the proof can be fetched again later.
func (k *Keybroker) ReceiptInclusion(ctx context.Context, env *receipt.Envelope) *tlog.Inclusion {
	r, err := env.Decode()
	if err == nil {
		var inc *tlog.Inclusion
		if inc, err = k.receiptInclusion(ctx, r.Tenant, r.VM, r.MigrationID); err == nil {
			return inc
		}
	}
	k.log.WarnContext(ctx, "Proving a receipt's log entry failed", attrError, err.Error())
	return nil
}

// checkDestroy checks a destroy request's form: names, ending, and proof with a commit only.
func checkDestroy(req *kbwire.DestroyRequest) error {
	if err := checkID(req.MigrationID); err != nil {
		return err
	}
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return err
	}
	switch req.Ending {
	case kbwire.Commit:
		if len(req.CommitAck) > grant.MaxCommitAck {
			return fmt.Errorf("commit acknowledgement of %d bytes exceeds %d: %w", len(req.CommitAck), grant.MaxCommitAck, ErrInvalidRequest)
		}
	case kbwire.Abort:
		if len(req.CommitAck) > 0 {
			return fmt.Errorf("a commit acknowledgement comes with a commit only: %w", ErrInvalidRequest)
		}
	default:
		return fmt.Errorf("ending %q is neither %q nor %q: %w", req.Ending, kbwire.Commit, kbwire.Abort, ErrInvalidRequest)
	}
	return nil
}

func (k *Keybroker) destroy(ctx context.Context, req *kbwire.DestroyRequest, ev *Event) (*receipt.Envelope, error) {
	if err := checkDestroy(req); err != nil {
		return nil, err
	}
	if a := req.Erasure; a != nil && a.Evidence != nil {
		d := a.Evidence.Digest()
		ev.ErasureEvidence = d[:]
	}
	// A destruction journaled already was checked when it was journaled: a repeat retries it.
	if p := k.jnl.get(kindDestroy, req.MigrationID); p != nil {
		if p.Tenant != req.Tenant || p.VM != req.VM {
			return nil, fmt.Errorf("migration id %s belongs to another guest: %w", req.MigrationID, ErrInvalidRequest)
		}
		if p.Ending != req.Ending {
			return nil, fmt.Errorf("migration %s has a pending %s: %w", req.MigrationID, p.Ending, ErrBothEpochs)
		}
		return k.complete(ctx, p)
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	if err := k.claimMigrationID(ctx, req.MigrationID, req.Tenant, req.VM, false); err != nil {
		return nil, err
	}
	var g guestRecord
	ver, err := k.recs.get(ctx, guestPath(req.Tenant, req.VM), &g)
	if err != nil {
		return nil, err
	}
	e := &journalEntry{
		Kind: kindDestroy, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM,
		Ending: req.Ending, RequestedAt: k.now().UTC(),
	}
	switch m := g.Migration; {
	case ver == 0 || m == nil || m.ID != req.MigrationID:
		// Ended already, by this keybroker or another? A repeat gets the stored receipt.
		env, err := k.storedReceipt(ctx, req.MigrationID, req.Tenant, req.VM, req.Ending)
		if !errors.Is(err, ErrUnknownMigration) {
			return env, err
		}
		if req.Ending == kbwire.Commit || ver == 0 || g.Epoch == 0 || m != nil {
			return nil, fmt.Errorf("migration %s of %s/%s: %w", req.MigrationID, req.Tenant, req.VM, ErrUnknownMigration)
		}
		// An abort before any release: executeDestroy records it.
	case req.Ending == kbwire.Commit && m.State == stateReleased:
		if err := k.proveCommit(ctx, req, m, e); err != nil {
			return nil, err
		}
	case req.Ending == kbwire.Abort && m.State == stateReleased:
		if err := k.proveAbort(ctx, req, m, e); err != nil {
			return nil, err
		}
	case req.Ending == kbwire.Commit && m.State == stateReleasing:
		return nil, fmt.Errorf("commit of migration %s whose keys were never released: %w", m.ID, ErrUnknownMigration)
	case req.Ending == kbwire.Commit && m.State == stateAborted, req.Ending == kbwire.Abort && m.State == stateCommitted:
		return nil, fmt.Errorf("%s of migration %s, which has %s: %w", req.Ending, m.ID, m.State, ErrBothEpochs)
	}
	// What is left: a proven commit, an abort, or a repeat of an ending already recorded in
	// the guest record (another keybroker's, or one whose journal was lost), which completes
	// it as recorded.
	if err := k.jnl.add(e); err != nil {
		return nil, err
	}
	if pending := k.jnl.get(kindDestroy, req.MigrationID); pending != nil {
		e = pending
	}
	return k.complete(ctx, e)
}

// proveCommit checks the proof a commit of the released migration m must carry, before
// anything is journaled or destroyed: the destination's commit acknowledgement, verified under
// the migration's transfer key, and the source's erasure evidence (unless req asks for an
// unverified erasure). It records the acknowledgement's digest and the erasure evidence in e
// and marks e proven. It returns ErrUnproven, the nonce errors, ErrEvidenceRejected, or
// ErrVaultUnavailable.
func (k *Keybroker) proveCommit(ctx context.Context, req *kbwire.DestroyRequest, m *migrationRecord, e *journalEntry) error {
	// What needs no Vault first.
	ack, err := grant.ParseCommitAck(req.CommitAck)
	if err != nil {
		return fmt.Errorf("%w: the destination's commit acknowledgement: %w", ErrUnproven, err)
	}
	if req.Erasure == nil && !req.UnverifiedErasure {
		return fmt.Errorf("%w: no erasure evidence from the source (a commit whose source is lost asks for an unverified erasure)", ErrUnproven)
	}
	tk, err := k.keys.decrypt(ctx, migrationKeyName(m.ID), m.WrappedTK)
	if err != nil {
		return fmt.Errorf("unwrapping the transfer key of migration %s: %w", m.ID, err)
	}
	err = ack.Verify(tk, m.ID)
	clear(tk)
	if err != nil {
		return fmt.Errorf("%w: the destination's commit acknowledgement: %w", ErrUnproven, err)
	}
	d := sha256.Sum256(req.CommitAck)
	e.CommitAckDigest = d[:]
	if req.Erasure != nil {
		er, err := k.verifyErasure(ctx, m, req.Erasure)
		if err != nil {
			return err
		}
		if !er.Accepted && !req.UnverifiedErasure {
			return fmt.Errorf("%w: %s", ErrErasureRejected, strings.Join(er.Reasons, "; "))
		}
		e.Erasure = er
	}
	e.Proven = true
	return nil
}

// proveAbort checks the proof an abort of the released migration m must carry before the
// destination's keys go: the destination's erasure evidence (role erased, bound to a fresh
// nonce, from the released destination), which an agent gives only for a migration it aborted
// without resuming the guest — so it proves the guest runs nowhere but at the source. Without
// it, req must ask for an unverified erasure (the destination host is lost), and the receipt
// then says aborted-unverified-erasure. It records the evidence in e and returns ErrUnproven,
// the nonce errors, ErrEvidenceRejected or ErrVaultUnavailable.
func (k *Keybroker) proveAbort(ctx context.Context, req *kbwire.DestroyRequest, m *migrationRecord, e *journalEntry) error {
	if req.Erasure == nil {
		if !req.UnverifiedErasure {
			return fmt.Errorf("%w: no evidence from the destination that it erased what it received and never resumed the guest (an abort whose destination is lost asks for an unverified erasure)", ErrUnproven)
		}
		return nil
	}
	er, err := k.verifyErasureFrom(ctx, m, req.Erasure, m.Destination, m.DestinationKey, "destination")
	if err != nil {
		return err
	}
	er.Accepted = true
	e.Erasure = er
	return nil
}

// verifyErasure consumes the nonce of the source's erasure evidence a, verifies the evidence
// bound to m's migration, checks that its statement names m and that it comes from the end m
// was released from, and judges it by the tenant's policy. It returns the nonce errors,
// ErrEvidenceRejected or ErrVaultUnavailable; a policy that does not accept the erasure is no
// error (see ErasureEvidence.Accepted and Reasons).
func (k *Keybroker) verifyErasure(ctx context.Context, m *migrationRecord, a *kbwire.Attestation) (*receipt.ErasureEvidence, error) {
	er, err := k.verifyErasureFrom(ctx, m, a, m.Source, m.SourceKey, "source")
	if err != nil {
		return nil, err
	}
	now := k.now().UTC()
	judgeErasure(er, m, now, now)
	return er, nil
}

// verifyErasureFrom consumes the nonce of erasure evidence a, verifies the evidence bound to m's
// migration (role erased), and checks that its statement names m and that it comes from the
// end released as want (what names it in errors).
func (k *Keybroker) verifyErasureFrom(ctx context.Context, m *migrationRecord, a *kbwire.Attestation, want receipt.EndClaims, wantKey []byte, what string) (*receipt.ErasureEvidence, error) {
	if err := k.consumeNonce(ctx, m.ID, attest.RoleErased, a.Nonce); err != nil {
		return nil, err
	}
	v := k.verifyEnd(ctx, m.ID, attest.RoleErased, *a, false)
	if v.err != nil {
		return nil, v.err
	}
	st, err := attest.ParseErasureStatement(v.claims.Statement)
	if err != nil {
		return nil, fmt.Errorf("erasure evidence: %w: %w", ErrEvidenceRejected, err)
	}
	if st.MigrationID != m.ID {
		return nil, fmt.Errorf("erasure statement names migration %q: %w", st.MigrationID, ErrEvidenceRejected)
	}
	claims := receipt.Summarize(v.claims)
	if err := claims.SameEnd(want); err != nil {
		if mm, ok := errors.AsType[*receipt.ClaimMismatch](err); ok {
			return nil, fmt.Errorf("erasure evidence from %s %s, the %s released was %s %s: %w", mm.Claim, mm.Got, what, mm.Claim, mm.Want, ErrEvidenceRejected)
		}
		return nil, fmt.Errorf("checking erasure evidence: %w: %w", ErrEvidenceRejected, err)
	}
	// Platform claims can be alike on two machines (a TDX FMSPC names a model; an SNP chip ID
	// can be masked): the evidence must also bind the HPKE key this end attested with in the
	// release, which no other agent, nor the other end, holds.
	if d := sha256.Sum256(a.Evidence.HPKEPublicKey); len(wantKey) == 0 || !bytes.Equal(d[:], wantKey) {
		return nil, fmt.Errorf("erasure evidence does not bind the HPKE key the %s was released to: %w", what, ErrEvidenceRejected)
	}
	return &receipt.ErasureEvidence{EndClaims: claims, Statement: v.claims.Statement}, nil
}

// complete attempts a journaled destruction and returns its receipt.
func (k *Keybroker) complete(ctx context.Context, e *journalEntry) (*receipt.Envelope, error) {
	if err := k.attempt(ctx, e); err != nil {
		switch {
		case errors.Is(err, ErrVaultUnavailable):
			return nil, fmt.Errorf("%w (journaled; retried until it completes): %w", ErrDestructionPending, err)
		case errors.Is(err, errConflict) && !errors.Is(err, ErrGuestBusy):
			return nil, fmt.Errorf("%w (journaled; retried until it completes): %w", ErrGuestBusy, err)
		}
		return nil, err
	}
	return k.storedReceipt(ctx, e.MigrationID, e.Tenant, e.VM, e.Ending)
}

// storedReceipt returns the stored receipt of migration id after checking that it is the
// guest's and that the migration ended the way asked. It returns ErrUnknownMigration when
// there is none, ErrInvalidRequest when it is another guest's, ErrBothEpochs when the
// migration ended the other way, or ErrVaultUnavailable.
func (k *Keybroker) storedReceipt(ctx context.Context, id, tenant, vm string, ending kbwire.Ending) (*receipt.Envelope, error) {
	var rr receiptRecord
	ver, err := k.recs.get(ctx, receiptPath(id), &rr)
	if err != nil {
		return nil, fmt.Errorf("reading receipt of migration %s: %w", id, err)
	}
	if ver == 0 || rr.Envelope == nil {
		return nil, fmt.Errorf("receipt of migration %s: %w", id, ErrUnknownMigration)
	}
	r, err := rr.Envelope.Decode()
	if err != nil {
		return nil, fmt.Errorf("decoding the stored receipt of migration %s: %w", id, err)
	}
	if err := receiptEnds(r, id, tenant, vm, ending); err != nil {
		return nil, err
	}
	return rr.Envelope, nil
}

// receiptEnds checks that r, stored under migration ID id, is a receipt of that migration of
// the guest, and that the migration ended with ending.
func receiptEnds(r *receipt.Receipt, id, tenant, vm string, ending kbwire.Ending) error {
	if r.MigrationID != id || r.Tenant != tenant || r.VM != vm {
		return fmt.Errorf("migration id %s belongs to another guest: %w", id, ErrInvalidRequest)
	}
	if endingOf(r.Outcome) != ending {
		return fmt.Errorf("migration %s already ended with outcome %s: %w", id, r.Outcome, ErrBothEpochs)
	}
	return nil
}

// endingOf returns the ending a receipt's outcome follows.
func endingOf(o receipt.Outcome) kbwire.Ending {
	if o == receipt.OutcomeAborted || o == receipt.OutcomeAbortedUnverifiedErasure {
		return kbwire.Abort
	}
	return kbwire.Commit
}

// attempt tries to complete a journal entry once. On success, or on an error that retrying
// cannot fix, the entry leaves the journal; on ErrVaultUnavailable it stays.
func (k *Keybroker) attempt(ctx context.Context, e *journalEntry) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	select {
	case <-e.done:
		return e.err
	default:
	}
	e.Attempts++
	var err error
	if err = k.ensureAuth(ctx); err == nil {
		switch e.Kind {
		case kindDestroy:
			err = k.executeDestroy(ctx, e)
		case kindCleanup:
			err = k.executeCleanup(ctx, e)
		case kindForget:
			err = k.executeForget(ctx, e)
		default:
			err = fmt.Errorf("unknown journal entry kind %q", e.Kind)
		}
	}
	if err != nil && (errors.Is(err, ErrVaultUnavailable) || errors.Is(err, errConflict)) {
		if serr := k.jnl.save(e); serr != nil {
			k.log.ErrorContext(ctx, "Saving a journal entry failed", attrMigration, e.MigrationID, attrError, serr.Error())
		}
		return err
	}
	if ferr := k.jnl.finish(e, err); ferr != nil {
		k.log.ErrorContext(ctx, "Removing a journal entry failed", attrMigration, e.MigrationID, attrError, ferr.Error())
	}
	return err
}

// retryPending attempts every pending journal entry once.
func (k *Keybroker) retryPending(ctx context.Context) {
	for _, e := range k.jnl.pending() {
		if ctx.Err() != nil {
			return
		}
		err := k.attempt(ctx, e)
		switch {
		case err == nil:
			k.log.InfoContext(ctx, "Pending destruction completed", attrMigration, e.MigrationID, attrAttempt, e.Attempts)
		case errors.Is(err, ErrVaultUnavailable) || errors.Is(err, errConflict):
			k.log.WarnContext(ctx, "Pending destruction still waiting for Vault", attrMigration, e.MigrationID, attrAttempt, e.Attempts, attrError, err.Error())
		default:
			k.log.ErrorContext(ctx, "Pending destruction refused", attrMigration, e.MigrationID, attrError, err.Error())
			switch e.Kind {
			case kindDestroy:
				k.emit(ctx, &Event{Kind: EventDestroy, MigrationID: e.MigrationID, Tenant: e.Tenant, VM: e.VM}, err)
			case kindForget:
				k.emit(ctx, forgetEvent(e), err)
			}
		}
	}
}

// executeDestroy moves the guest record to the migration's ending, destroys the keys that
// ending names and signs the receipt. Every step is idempotent, so a retry picks up where
// the last attempt stopped. It claims the migration ID for the entry's guest first, so that
// no entry (a journal file written before IDs were bound, a retry) reaches another guest's
// keys or receipt, and it moves a released migration to committed only for a proven entry.
func (k *Keybroker) executeDestroy(ctx context.Context, e *journalEntry) error {
	if err := k.claimMigrationID(ctx, e.MigrationID, e.Tenant, e.VM, false); err != nil {
		return err
	}
	path := guestPath(e.Tenant, e.VM)
	var g guestRecord
	ver, err := k.recs.get(ctx, path, &g)
	if err != nil {
		return err
	}
	m := g.Migration
	if ver == 0 || m == nil || m.ID != e.MigrationID {
		// Already completed (by this or another keybroker)?
		_, err := k.storedReceipt(ctx, e.MigrationID, e.Tenant, e.VM, e.Ending)
		if err == nil {
			return k.endMigrationID(ctx, e.MigrationID)
		}
		if !errors.Is(err, ErrUnknownMigration) {
			return err
		}
		if e.Ending != kbwire.Abort || ver == 0 || g.Epoch == 0 || m != nil {
			return fmt.Errorf("migration %s of %s/%s: %w", e.MigrationID, e.Tenant, e.VM, ErrUnknownMigration)
		}
		// An abort before any release (the broker aborts on a denial, a timeout or a lost
		// agent while attesting): record the migration as aborted, so that a release of it
		// still in flight loses its reservation, then destroy whatever keys of its name exist
		// and sign an abort receipt like any other. The ID is this guest's (claimed above), so
		// the migration key of that name is no other guest's.
		m = &migrationRecord{
			ID: e.MigrationID, State: stateAborted, FromEpoch: g.Epoch, ToEpoch: g.Epoch + 1,
			EndedAt: e.RequestedAt,
		}
		g.Migration = m
		if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
			return err
		}
	}

	// Move the record to the ending (once).
	switch e.Ending {
	case kbwire.Commit:
		switch m.State {
		case stateAborted:
			return fmt.Errorf("commit of migration %s after its abort: %w", m.ID, ErrBothEpochs)
		case stateReleasing:
			return fmt.Errorf("commit of migration %s whose keys were never released: %w", m.ID, ErrUnknownMigration)
		case stateReleased:
			if !e.Proven {
				return fmt.Errorf("%w: commit of migration %s was journaled without its proof", ErrUnproven, m.ID)
			}
			// The epoch the commit ends must not have a reissue's entry still to come.
			if r := g.Reissuing; r.holds(k.now()) {
				return fmt.Errorf("commit of migration %s waits for reissue %s of epoch %d: %w", m.ID, r.ID, g.Epoch, errConflict)
			}
			g.Reissuing = nil // lapsed
			g.Epoch, g.WrappedMDK = m.ToEpoch, m.WrappedMDK
			m.State, m.EndedAt, m.Erasure = stateCommitted, e.RequestedAt, e.Erasure
			m.CommitAckDigest = e.CommitAckDigest
			if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
				return err
			}
		}
	case kbwire.Abort:
		switch m.State {
		case stateCommitted:
			return fmt.Errorf("abort of migration %s after its commit: %w", m.ID, ErrBothEpochs)
		case stateReleasing, stateReleased:
			m.AbortUnverified = m.State == stateReleased && e.Erasure == nil
			m.State, m.EndedAt, m.Erasure = stateAborted, e.RequestedAt, e.Erasure
			if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
				return err
			}
		}
	}

	names, err := destructionPlan(e.Tenant, e.VM, &g)
	if err != nil {
		return err
	}
	if err := k.destroyKeys(ctx, e, names); err != nil {
		return err
	}

	// Sign and store the receipt, end the ID, then close the migration.
	r := &receipt.Receipt{
		Kind: receipt.Kind, MigrationID: m.ID, Tenant: e.Tenant, VM: e.VM,
		Policy: m.Policy, Source: m.Source, Destination: m.Destination, CleanMemory: m.CleanMemory,
		CommitAckDigest: m.CommitAckDigest, FromEpoch: m.FromEpoch, ToEpoch: m.ToEpoch,
		DestroyedKeys: e.Destroyed, EndedAt: m.EndedAt, IssuedAt: k.now().UTC(),
		Caveats: []string{snapshotCaveat},
	}
	if m.ReleasedAt.IsZero() {
		r.Caveats = append(r.Caveats, "the migration ended before the keybroker released any key")
	}
	r.Outcome, r.Erasure = outcome(m, r.IssuedAt, &r.Caveats)
	env, err := k.signReceipt(ctx, r)
	if err != nil {
		return err
	}
	if _, err := k.recs.put(ctx, receiptPath(m.ID), &receiptRecord{Envelope: env}, 0); err != nil {
		if !errors.Is(err, errConflict) {
			return err
		}
		// Stored by an earlier attempt, or by another keybroker: it must be this guest's.
		if env, err = k.storedReceipt(ctx, m.ID, e.Tenant, e.VM, e.Ending); err != nil {
			return err
		}
		if r, err = env.Decode(); err != nil {
			return err
		}
	}
	if _, err := k.logDecision(ctx, endingEntry(r, env), true); err != nil {
		return err
	}
	if err := k.endMigrationID(ctx, m.ID); err != nil {
		return err
	}
	g.Migration, g.LastMigration = nil, m.ID
	if _, err := k.recs.put(ctx, path, &g, ver); err != nil {
		return err
	}
	ev := Event{
		Kind: EventDestroy, MigrationID: m.ID, Tenant: e.Tenant, VM: e.VM,
		SourceEvidence: m.Source.EvidenceDigest, DestinationEvidence: m.Destination.EvidenceDigest,
		PolicyDigest: m.Policy.Digest, PolicySVN: m.Policy.SVN, Keys: names,
	}
	if m.Erasure != nil {
		ev.ErasureEvidence = m.Erasure.EvidenceDigest
	}
	if r.Outcome == receipt.OutcomeCommittedUnverifiedErasure {
		k.log.WarnContext(ctx, "Migration committed without proof of the source's erasure", attrMigration, m.ID, attrReasons, r.Caveats[len(r.Caveats)-1])
	}
	k.emit(ctx, &ev, nil)
	return nil
}

// endingEntry is the log entry of a migration's ending: its receipt r, signed in env.
func endingEntry(r *receipt.Receipt, env *receipt.Envelope) *tlog.Entry {
	e := &tlog.Entry{
		Kind: tlog.KindCommit, Tenant: r.Tenant, VM: r.VM, MigrationID: r.MigrationID,
		FromEpoch: r.FromEpoch, ToEpoch: r.ToEpoch, Statement: tlog.StatementDigest(env.Payload),
		Outcome: string(r.Outcome),
	}
	if endingOf(r.Outcome) == kbwire.Abort {
		e.Kind = tlog.KindAbort
	}
	for _, d := range []attest.HexBytes{r.Source.EvidenceDigest, r.Destination.EvidenceDigest} {
		if len(d) > 0 {
			e.Evidence = append(e.Evidence, d)
		}
	}
	if r.Erasure != nil {
		e.Evidence = append(e.Evidence, r.Erasure.EvidenceDigest)
	}
	for _, k := range r.DestroyedKeys {
		e.DestroyedKeys = append(e.DestroyedKeys, k.Name)
	}
	return e
}

// outcome returns the outcome of an ended migration and the erasure evidence its receipt
// quotes, judged again at now (the policy's deadline runs from the commit to the receipt), and
// adds to caveats what the receipt does not prove. A commit says erased only with erasure
// evidence the tenant's policy accepts; without, it says committed-unverified-erasure.
func outcome(m *migrationRecord, now time.Time, caveats *[]string) (receipt.Outcome, *receipt.ErasureEvidence) {
	if m.State == stateAborted {
		if m.AbortUnverified {
			*caveats = append(*caveats, "the destination sent no erasure evidence (the abort asked for an unverified erasure): its keys are destroyed, but that it scrubbed what it received and never resumed the guest is not attested")
			return receipt.OutcomeAbortedUnverifiedErasure, nil
		}
		return receipt.OutcomeAborted, m.Erasure
	}
	if m.Erasure == nil {
		*caveats = append(*caveats, "the source sent no erasure evidence (the commit asked for an unverified erasure): what it kept is under destroyed keys, but that it scrubbed it is not attested")
		return receipt.OutcomeCommittedUnverifiedErasure, nil
	}
	er := *m.Erasure
	judgeErasure(&er, m, m.EndedAt, now)
	if !er.Accepted {
		*caveats = append(*caveats, "the source's erasure evidence does not satisfy the tenant's policy ("+strings.Join(er.Reasons, "; ")+"): what it kept is under destroyed keys, but that it scrubbed it is not attested")
		return receipt.OutcomeCommittedUnverifiedErasure, &er
	}
	return receipt.OutcomeErased, &er
}

// destructionPlan returns the keys a migration's ending destroys, after checking that they
// do not include the guest's live epoch: no plan ever destroys both epochs of a guest.
func destructionPlan(tenant, vm string, g *guestRecord) ([]string, error) {
	m := g.Migration
	var epoch uint64
	switch m.State {
	case stateCommitted:
		epoch = m.FromEpoch
	case stateAborted:
		epoch = m.ToEpoch
	default:
		return nil, fmt.Errorf("migration %s is %s, not ended", m.ID, m.State)
	}
	if epoch == g.Epoch || m.ToEpoch != m.FromEpoch+1 {
		return nil, fmt.Errorf("migration %s would destroy the live epoch %d: %w", m.ID, g.Epoch, ErrBothEpochs)
	}
	return []string{migrationKeyName(m.ID), epochKeyName(tenant, vm, epoch)}, nil
}

// destroyKeys deletes the named keys not yet recorded as destroyed in e, recording each.
func (k *Keybroker) destroyKeys(ctx context.Context, e *journalEntry, names []string) error {
outer:
	for _, name := range names {
		for _, d := range e.Destroyed {
			if d.Name == name {
				continue outer
			}
		}
		tk, err := k.keys.readKey(ctx, name)
		if err != nil {
			return err
		}
		latest := 0
		if tk != nil {
			latest = tk.LatestVersion
			if err := k.keys.deleteKey(ctx, name); err != nil {
				return err
			}
		}
		e.Destroyed = append(e.Destroyed, receipt.DestroyedKey{Name: name, LatestVersion: latest, DestroyedAt: k.now().UTC()})
		if err := k.jnl.save(e); err != nil {
			return err
		}
	}
	return nil
}

// executeCleanup destroys the keys of a failed release and clears its reservation. Like
// executeDestroy it first claims the migration ID for the entry's guest: a migration key of
// that name that is another guest's is left alone.
func (k *Keybroker) executeCleanup(ctx context.Context, e *journalEntry) error {
	if err := k.claimMigrationID(ctx, e.MigrationID, e.Tenant, e.VM, false); err != nil {
		return err
	}
	path := guestPath(e.Tenant, e.VM)
	var g guestRecord
	ver, err := k.recs.get(ctx, path, &g)
	if err != nil {
		return err
	}
	// A release that failed after recording itself as released never handed its keys out: its
	// keys go as those of a release that failed earlier. One that ended is Destroy's business.
	if ver != 0 && g.Migration != nil && g.Migration.ID == e.MigrationID && g.Migration.State != stateReleasing && g.Migration.State != stateReleased {
		return fmt.Errorf("cleanup of migration %s, which has %s: %w", e.MigrationID, g.Migration.State, ErrBothEpochs)
	}
	// The epoch key goes only while it is still this release's: not once the guest lives in
	// that epoch, nor when another migration of the guest holds the reservation.
	keys := []string{migrationKeyName(e.MigrationID)}
	if ver == 0 || g.Epoch < e.Epoch && (g.Migration == nil || g.Migration.ID == e.MigrationID) {
		keys = append(keys, epochKeyName(e.Tenant, e.VM, e.Epoch))
		if ver != 0 && g.Migration == nil {
			// Hold the guest while its epoch key goes, so that no new release reserves it and
			// creates the same key in between (a conflict here is retried).
			g.Migration = &migrationRecord{ID: e.MigrationID, State: stateReleasing, FromEpoch: g.Epoch, ToEpoch: e.Epoch}
			if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
				return err
			}
		}
	}
	if err := k.destroyKeys(ctx, e, keys); err != nil {
		return err
	}
	entry := &tlog.Entry{
		Kind: tlog.KindCleanup, Tenant: e.Tenant, VM: e.VM, MigrationID: e.MigrationID,
		FromEpoch: e.Epoch - 1, ToEpoch: e.Epoch, DestroyedKeys: keys,
	}
	if _, err := k.logDecision(ctx, entry, true); err != nil {
		return err
	}
	if ver != 0 && g.Migration != nil && g.Migration.ID == e.MigrationID {
		g.Migration = nil
		if _, err := k.recs.put(ctx, path, &g, ver); err != nil {
			return err
		}
	}
	k.log.InfoContext(ctx, "Keys of a failed release destroyed", attrMigration, e.MigrationID, attrKeys, keys)
	return nil
}

// Receipt returns the signed receipt of a migration. It returns ErrInvalidRequest for a
// malformed ID, ErrDestructionPending while its destruction is journaled, ErrUnknownMigration
// when there is none, or ErrVaultUnavailable.
func (k *Keybroker) Receipt(ctx context.Context, migrationID string) (*receipt.Envelope, error) {
	if err := checkID(migrationID); err != nil {
		return nil, fmt.Errorf("receipt: %w", err)
	}
	if k.jnl.get(kindDestroy, migrationID) != nil {
		return nil, fmt.Errorf("receipt of migration %s: %w", migrationID, ErrDestructionPending)
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	var rr receiptRecord
	ver, err := k.recs.get(ctx, receiptPath(migrationID), &rr)
	if err != nil {
		return nil, fmt.Errorf("reading receipt of migration %s: %w", migrationID, err)
	}
	if ver == 0 || rr.Envelope == nil {
		return nil, fmt.Errorf("receipt of migration %s: %w", migrationID, ErrUnknownMigration)
	}
	return rr.Envelope, nil
}

// AwaitReceipt waits until the migration's journaled destruction completes (Run retries it)
// and returns its receipt. It returns ctx's error if ctx ends first, the error that made the
// destruction be dropped (ErrBothEpochs, ErrUnknownMigration), or Receipt's errors.
func (k *Keybroker) AwaitReceipt(ctx context.Context, migrationID string) (*receipt.Envelope, error) {
	if e := k.jnl.get(kindDestroy, migrationID); e != nil {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("awaiting receipt of migration %s: %w", migrationID, ctx.Err())
		case <-e.done:
			if e.err != nil {
				return nil, fmt.Errorf("awaiting receipt of migration %s: %w", migrationID, e.err)
			}
		}
	}
	return k.Receipt(ctx, migrationID)
}

// signingKey returns the receipt-signing public key, creating the Transit key on first use.
func (k *Keybroker) signingKey(ctx context.Context) (ed25519.PublicKey, error) {
	k.signMu.Lock()
	defer k.signMu.Unlock()
	if k.signPub != nil {
		return k.signPub, nil
	}
	// Created if missing; an existing one (another keybroker's) is checked like a new one:
	// a key that was created exportable or imported would let whoever prepared it sign grants
	// and receipts in the keybroker's name.
	if err := k.keys.createKey(ctx, ReceiptSigningKey, "ed25519"); err != nil {
		return nil, fmt.Errorf("checking the signing key: %w", err)
	}
	tk, err := k.keys.readKey(ctx, ReceiptSigningKey)
	if err != nil {
		return nil, err
	}
	if tk == nil || tk.Type != "ed25519" || tk.PublicKey == nil {
		return nil, fmt.Errorf("transit key %s is not an ed25519 key", ReceiptSigningKey)
	}
	k.signPub = tk.PublicKey
	return k.signPub, nil
}

func (k *Keybroker) signReceipt(ctx context.Context, r *receipt.Receipt) (*receipt.Envelope, error) {
	pub, err := k.signingKey(ctx)
	if err != nil {
		return nil, err
	}
	return receipt.Sign(r, pub, func(msg []byte) ([]byte, error) { return k.keys.sign(ctx, ReceiptSigningKey, msg) })
}

// PublicKey returns the public key that verifies receipts, creating the signing key in Vault
// on first use. It returns ErrVaultUnavailable when Vault cannot be reached.
func (k *Keybroker) PublicKey(ctx context.Context) (ed25519.PublicKey, error) {
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	pub, err := k.signingKey(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the receipt-signing key: %w", err)
	}
	return pub, nil
}

// PublicKeyPEM is PublicKey as PEM, the form tenants pin.
func (k *Keybroker) PublicKeyPEM(ctx context.Context) ([]byte, error) {
	pub, err := k.PublicKey(ctx)
	if err != nil {
		return nil, err
	}
	return receipt.MarshalPublicKeyPEM(pub)
}

// judgeErasure evaluates the policy's erasure rules on the source's erasure evidence (already
// verified, its binding and its end included, when the commit was requested), committed at
// committed and judged at now. The policy is the one the migration was released under, read
// back from the keybroker's own record.
func judgeErasure(er *receipt.ErasureEvidence, m *migrationRecord, committed, now time.Time) {
	deny := func(reason string) { er.Accepted, er.Reasons = false, []string{reason} }
	penv, err := policy.ParseEnvelope(m.SignedPolicy)
	if err != nil {
		deny("policy: " + err.Error())
		return
	}
	p, err := policy.Parse("policy", penv.Payload)
	if err != nil {
		deny("policy: " + err.Error())
		return
	}
	claims := &attest.Claims{EvidenceDigest: er.EvidenceDigest, Statement: er.Statement}
	d := policy.EvaluateErasure(p, claims, m.ID, committed, now)
	er.Accepted, er.Reasons = d.Allow, nil
	for _, r := range d.Reasons {
		er.Reasons = append(er.Reasons, r.Rule+": "+r.Message)
	}
}
