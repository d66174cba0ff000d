package keybroker

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/policy"
)

// snapshotCaveat is stated in every receipt.
const snapshotCaveat = "Vault snapshots or backups taken while a destroyed key existed still hold it; the operator must handle them"

// maxCommitAck bounds a commit acknowledgement.
const maxCommitAck = 4096

// receiptRecord is a signed receipt, in KV at receipts/<migration-id>.
type receiptRecord struct {
	Envelope *receipt.Envelope `json:"envelope"`
}

// Destroy ends a migration: on commit it moves the guest to epoch e+1 and destroys the
// migration key and the epoch-e key; on abort it destroys the migration key and the
// epoch-(e+1) key. Then it signs and stores the receipt and returns it. The destruction is
// journaled before it starts; if Vault cannot be reached it stays journaled, Run retries it
// until it completes, and Destroy returns ErrDestructionPending (AwaitReceipt waits for the
// receipt). A repeated request with the same ending is idempotent: it returns the same receipt
// (erasure evidence and commit acknowledgement of a repeat are checked, then ignored).
//
// An abort of a migration the keybroker never released, for an adopted guest with no other
// migration in progress, is recorded, destroys whatever keys of that migration's names exist
// (a release still in flight loses its reservation and cleans up after itself) and is answered
// with an abort receipt, so that every abort ends with one.
//
// It returns ErrInvalidRequest; ErrNonceUnknown, ErrNonceExpired, ErrNonceUsed or
// ErrEvidenceRejected for erasure evidence; ErrUnknownMigration; ErrBothEpochs (the
// migration already ended the other way); ErrDestructionPending; or an error wrapping
// ErrVaultUnavailable when signing the receipt is what failed (the keys are destroyed, the
// receipt follows through the journal).
func (k *Keybroker) Destroy(ctx context.Context, req *DestroyRequest) (*DestroyResponse, error) {
	ev := Event{Kind: EventDestroy, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM}
	env, err := k.destroy(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("destroying keys of migration %s: %w", req.MigrationID, err)
		if !errors.Is(err, ErrDestructionPending) {
			k.emit(ctx, &ev, err)
		}
		return nil, err
	}
	return &DestroyResponse{Receipt: env}, nil
}

func (k *Keybroker) destroy(ctx context.Context, req *DestroyRequest, ev *Event) (*receipt.Envelope, error) {
	if err := checkID(req.MigrationID); err != nil {
		return nil, err
	}
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if req.Ending != Commit && req.Ending != Abort {
		return nil, fmt.Errorf("ending %q is neither %q nor %q: %w", req.Ending, Commit, Abort, ErrInvalidRequest)
	}
	e := &journalEntry{
		Kind: kindDestroy, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM,
		Ending: req.Ending, RequestedAt: k.now().UTC(),
	}
	if a := req.Erasure; a != nil {
		if req.Ending != Commit {
			return nil, fmt.Errorf("erasure evidence comes with a commit only: %w", ErrInvalidRequest)
		}
		if a.Evidence != nil {
			d := a.Evidence.Digest()
			ev.ErasureEvidence = d[:]
		}
		if err := k.consumeNonce(ctx, req.MigrationID, attest.RoleErased, a.Nonce); err != nil {
			return nil, err
		}
		v := k.verifyEnd(ctx, req.MigrationID, attest.RoleErased, *a, false)
		if v.err != nil {
			return nil, v.err
		}
		st, err := attest.ParseErasureStatement(v.claims.Statement)
		if err != nil {
			return nil, fmt.Errorf("erasure evidence: %w: %w", ErrEvidenceRejected, err)
		}
		if st.MigrationID != req.MigrationID {
			return nil, fmt.Errorf("erasure statement names migration %q: %w", st.MigrationID, ErrEvidenceRejected)
		}
		e.Erasure = &receipt.ErasureEvidence{EvidenceDigest: v.claims.EvidenceDigest, Statement: v.claims.Statement}
	}
	if len(req.CommitAck) > 0 {
		if req.Ending != Commit {
			return nil, fmt.Errorf("a commit acknowledgement comes with a commit only: %w", ErrInvalidRequest)
		}
		if len(req.CommitAck) > maxCommitAck {
			return nil, fmt.Errorf("commit acknowledgement of %d bytes exceeds %d: %w", len(req.CommitAck), maxCommitAck, ErrInvalidRequest)
		}
		d := sha256.Sum256(req.CommitAck)
		e.CommitAckDigest = d[:]
	}
	if err := k.jnl.add(e); err != nil {
		return nil, err
	}
	if pending := k.jnl.get(kindDestroy, req.MigrationID); pending != nil {
		e = pending
	}
	if err := k.attempt(ctx, e); err != nil {
		if errors.Is(err, ErrVaultUnavailable) {
			return nil, fmt.Errorf("%w (journaled; retried until it completes): %w", ErrDestructionPending, err)
		}
		return nil, err
	}
	return k.Receipt(ctx, req.MigrationID)
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
			if e.Kind == kindDestroy {
				k.emit(ctx, &Event{Kind: EventDestroy, MigrationID: e.MigrationID, Tenant: e.Tenant, VM: e.VM}, err)
			}
		}
	}
}

// executeDestroy moves the guest record to the migration's ending, destroys the keys that
// ending names and signs the receipt. Every step is idempotent, so a retry picks up where
// the last attempt stopped.
func (k *Keybroker) executeDestroy(ctx context.Context, e *journalEntry) error {
	path := guestPath(e.Tenant, e.VM)
	var g guestRecord
	ver, err := k.recs.get(ctx, path, &g)
	if err != nil {
		return err
	}
	m := g.Migration
	if ver == 0 || m == nil || m.ID != e.MigrationID {
		// Already completed (by this or another keybroker)?
		var rr receiptRecord
		rver, err := k.recs.get(ctx, receiptPath(e.MigrationID), &rr)
		if err != nil {
			return err
		}
		if rver != 0 && rr.Envelope != nil {
			r, derr := rr.Envelope.Decode()
			if derr == nil && (r.Outcome == receipt.OutcomeErased) != (e.Ending == Commit) {
				return fmt.Errorf("migration %s already ended with outcome %s: %w", e.MigrationID, r.Outcome, ErrBothEpochs)
			}
			return nil
		}
		if e.Ending != Abort || ver == 0 || g.Epoch == 0 || m != nil {
			return fmt.Errorf("migration %s of %s/%s: %w", e.MigrationID, e.Tenant, e.VM, ErrUnknownMigration)
		}
		// An abort before any release (the broker aborts on a denial, a timeout or a lost
		// agent while attesting): record the migration as aborted, so that a release of it
		// still in flight loses its reservation, then destroy whatever keys of its name exist
		// and sign an abort receipt like any other.
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
	case Commit:
		switch m.State {
		case stateAborted:
			return fmt.Errorf("commit of migration %s after its abort: %w", m.ID, ErrBothEpochs)
		case stateReleasing:
			return fmt.Errorf("commit of migration %s whose keys were never released: %w", m.ID, ErrUnknownMigration)
		case stateReleased:
			g.Epoch, g.WrappedMDK = m.ToEpoch, m.WrappedMDK
			m.State, m.EndedAt, m.Erasure = stateCommitted, e.RequestedAt, e.Erasure
			m.CommitAckDigest = e.CommitAckDigest
			if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
				return err
			}
		}
	case Abort:
		switch m.State {
		case stateCommitted:
			return fmt.Errorf("abort of migration %s after its commit: %w", m.ID, ErrBothEpochs)
		case stateReleasing, stateReleased:
			m.State, m.EndedAt = stateAborted, e.RequestedAt
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

	// Sign and store the receipt, then close the migration.
	outcome := receipt.OutcomeErased
	if m.State == stateAborted {
		outcome = receipt.OutcomeAborted
	}
	r := &receipt.Receipt{
		Kind: receipt.Kind, MigrationID: m.ID, Tenant: e.Tenant, VM: e.VM, Outcome: outcome,
		Policy: m.Policy, Source: m.Source, Destination: m.Destination, CleanMemory: m.CleanMemory,
		Erasure: m.Erasure, CommitAckDigest: m.CommitAckDigest, FromEpoch: m.FromEpoch, ToEpoch: m.ToEpoch,
		DestroyedKeys: e.Destroyed, EndedAt: m.EndedAt, IssuedAt: k.now().UTC(),
		Caveats: []string{snapshotCaveat},
	}
	if m.ReleasedAt.IsZero() {
		r.Caveats = append(r.Caveats, "the migration ended before the keybroker released any key")
	}
	if m.Erasure == nil && outcome == receipt.OutcomeErased {
		r.Caveats = append(r.Caveats, "the source sent no erasure evidence: its scrubbing is not attested")
	}
	if r.Erasure != nil {
		judgeErasure(r.Erasure, m, r.IssuedAt)
		if !r.Erasure.Accepted {
			r.Caveats = append(r.Caveats, "the source's erasure evidence does not satisfy the tenant's policy: see erasure.reasons")
		}
	}
	env, err := k.signReceipt(ctx, r)
	if err != nil {
		return err
	}
	if _, err := k.recs.put(ctx, receiptPath(m.ID), &receiptRecord{Envelope: env}, 0); err != nil && !errors.Is(err, errConflict) {
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
	k.emit(ctx, &ev, nil)
	return nil
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

// executeCleanup destroys the keys of a failed release and clears its reservation.
func (k *Keybroker) executeCleanup(ctx context.Context, e *journalEntry) error {
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
	tk, err := k.keys.readKey(ctx, ReceiptSigningKey)
	if err != nil {
		return nil, err
	}
	if tk == nil {
		if err := k.keys.createKey(ctx, ReceiptSigningKey, "ed25519"); err != nil {
			return nil, err
		}
		if tk, err = k.keys.readKey(ctx, ReceiptSigningKey); err != nil {
			return nil, err
		}
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
// verified, its binding included, when the commit was requested). The policy is the one the
// migration was released under, read back from the keybroker's own record.
func judgeErasure(er *receipt.ErasureEvidence, m *migrationRecord, now time.Time) {
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
	d := policy.EvaluateErasure(p, claims, m.ID, m.EndedAt, now)
	er.Accepted, er.Reasons = d.Allow, nil
	for _, r := range d.Reasons {
		er.Reasons = append(er.Reasons, r.Rule+": "+r.Message)
	}
}
