package keybroker

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// Migration states in a guest record.
const (
	stateReleasing = "releasing" // keys being created; cleaned up if the release fails
	stateReleased  = "released"
	stateCommitted = "committed" // epoch moved on; keys being destroyed
	stateAborted   = "aborted"   // keys being destroyed
	// stateForgetting holds a guest being forgotten (Forget): its live epoch's key is being
	// destroyed, so that no release, reissue nor adoption uses the guest meanwhile.
	stateForgetting = "forgetting"
)

// migrationRecord is a migration in progress, inside its guest's record.
type migrationRecord struct {
	ID    string `json:"id"`
	State string `json:"state"`
	// SourceKey and DestinationKey are the SHA-256 of the HPKE public keys the keys were
	// sealed to: each end's erasure evidence must bind its own.
	SourceKey      attest.HexBytes `json:"sourceKey,omitempty"`
	DestinationKey attest.HexBytes `json:"destinationKey,omitempty"`
	// AbortUnverified: the migration aborted after its keys were released, without the
	// destination's evidence that it erased and never resumed the guest.
	AbortUnverified bool                     `json:"abortUnverified,omitempty"`
	FromEpoch       uint64                   `json:"fromEpoch"`
	ToEpoch         uint64                   `json:"toEpoch"`
	WrappedTK       string                   `json:"wrappedTk,omitempty"`
	WrappedMDK      string                   `json:"wrappedMdk,omitempty"`
	Policy          receipt.PolicyRef        `json:"policy"`
	Source          receipt.EndClaims        `json:"source"`
	Destination     receipt.EndClaims        `json:"destination"`
	CleanMemory     json.RawMessage          `json:"cleanMemory,omitempty"`
	ReleasedAt      time.Time                `json:"releasedAt"`
	EndedAt         time.Time                `json:"endedAt,omitzero"`
	Erasure         *receipt.ErasureEvidence `json:"erasure,omitempty"`
	// CommitAckDigest is the SHA-256 of the commit acknowledgement the commit came with.
	CommitAckDigest []byte `json:"commitAckDigest,omitempty"`
	// DestinationHost is the host the keys were released to; a repeated release of the
	// migration must name the same one.
	DestinationHost string `json:"destinationHost,omitempty"`
	// SignedPolicy is the tenant's signed policy the migration was released under, for
	// judging the source's erasure at commit.
	SignedPolicy []byte `json:"signedPolicy,omitempty"`
}

// Release verifies both ends of a migration and releases its keys: TK sealed to the source,
// TK and MDK_{e+1} sealed to the destination. It emits one audit event, allow or deny.
//
// It returns ErrInvalidRequest; ErrNonceUnknown, ErrNonceExpired or ErrNonceUsed;
// ErrEvidenceRejected; ErrUnknownTenant; ErrNotAdopted; ErrPolicyRejected (signature,
// rollback); ErrDenied (with the policy's reasons); ErrGuestBusy (another migration of the
// guest is in progress, or a repeated release names another destination host); or
// ErrVaultUnavailable, in which case nothing was released and any key created was destroyed
// (or, with Vault gone, journaled for destruction). A migration ID that already ended is
// ErrInvalidRequest.
//
// Release is repeatable: a request for a migration whose keys were released already (the
// broker reruns its attestation after a crash) is verified and evaluated like the first, with
// its own fresh nonces and evidence, and answered with the same migration's keys (same epochs,
// same wrapped MDK) sealed to the new evidence's HPKE keys.
func (k *Keybroker) Release(ctx context.Context, req *kbwire.ReleaseRequest) (*kbwire.ReleaseResponse, error) {
	start := time.Now()
	ev := Event{Kind: EventRelease, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM, Host: req.DestinationHost.Name}
	span := k.cfg.Tracer.Start(ctx, req.MigrationID, "keybroker.release", attribute.String("lethe.destination", req.DestinationHost.Name))
	if e := req.Source.Evidence; e != nil {
		d := e.Digest()
		ev.SourceEvidence = d[:]
	}
	if e := req.Destination.Evidence; e != nil {
		d := e.Digest()
		ev.DestinationEvidence = d[:]
	}
	resp, err := k.release(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("releasing keys of migration %s: %w", req.MigrationID, err)
	}
	k.emit(ctx, &ev, err)
	k.cfg.Metrics.Released(ev.Decision, time.Since(start))
	span.End(spanError(err), attribute.String("lethe.decision", string(ev.Decision)))
	return resp, err
}

// spanError is what a span records of err: its wire code only, since messages may name claims
// of evidence.
func spanError(err error) error {
	if err == nil {
		return nil
	}
	return errors.New(ErrorCode(err))
}

// emit completes ev with the outcome of err and sends it to the audit sink.
func (k *Keybroker) emit(ctx context.Context, ev *Event, err error) {
	ev.Schema = AuditSchema
	ev.Time = k.now().UTC()
	switch {
	case err == nil:
		ev.Decision = DecisionAllow
	case errors.Is(err, ErrVaultUnavailable):
		ev.Decision = DecisionError
	default:
		ev.Decision = DecisionDeny
	}
	if err != nil && len(ev.Reasons) == 0 {
		ev.Reasons = []string{err.Error()}
	}
	k.cfg.Metrics.Decided(ev.Kind, ev.Decision, ErrorCode(err))
	k.audit.Audit(context.WithoutCancel(ctx), *ev)
	if ev.Decision == DecisionDeny {
		k.logDenial(context.WithoutCancel(ctx), ev)
	}
}

type verified struct {
	claims *attest.Claims
	err    error
}

// verifyEnd consumes an attestation's nonce result and verifies its evidence bound to role.
func (k *Keybroker) verifyEnd(ctx context.Context, id string, role attest.Role, a kbwire.Attestation, needKey bool) verified {
	if a.Evidence == nil {
		return verified{err: fmt.Errorf("no %s evidence: %w", role, ErrInvalidRequest)}
	}
	if needKey {
		if err := seal.CheckPublicKey(a.Evidence.HPKEPublicKey); err != nil {
			return verified{err: fmt.Errorf("%s evidence: %w: %w", role, ErrInvalidRequest, err)}
		}
	}
	b := attest.BindingFor(id, role, a.Nonce, a.Evidence)
	c, err := k.cfg.Verifier.Verify(ctx, a.Evidence, attest.Expectation{Binding: &b})
	if err != nil {
		if ctx.Err() != nil {
			return verified{err: err}
		}
		return verified{err: fmt.Errorf("%s evidence: %w: %w", role, ErrEvidenceRejected, err)}
	}
	return verified{claims: c}
}

func (k *Keybroker) release(ctx context.Context, req *kbwire.ReleaseRequest, ev *Event) (*kbwire.ReleaseResponse, error) {
	if err := checkID(req.MigrationID); err != nil {
		return nil, err
	}
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	// Both nonces are checked first, without Vault (a forged or expired one costs nothing
	// more), then spent while the evidence is verified: one Vault write each, in parallel, that
	// only one consumer of a nonce wins, whichever keybroker it runs on. Nothing below the
	// wait acts on a release whose nonces were not both spent by this call.
	srcNonce, n1 := k.nonces.check(ctx, req.MigrationID, attest.RoleSource, req.Source.Nonce)
	dstNonce, n2 := k.nonces.check(ctx, req.MigrationID, attest.RoleDestination, req.Destination.Nonce)
	if err := errors.Join(n1, n2); err != nil {
		return nil, err
	}

	var timings kbwire.ReleaseTimings
	start := time.Now()
	// Spend the nonces, verify both ends and read the records, all at once.
	var (
		src, dst   verified
		tenant     *tenantRecord
		tenantVer  int
		guest      guestRecord
		guestVer   int
		tErr, gErr error
		cErr       error
		wg         sync.WaitGroup
	)
	wg.Go(func() { n1 = k.nonces.spend(ctx, srcNonce) })
	wg.Go(func() { n2 = k.nonces.spend(ctx, dstNonce) })
	wg.Go(func() { src = k.verifyEnd(ctx, req.MigrationID, attest.RoleSource, req.Source, true) })
	wg.Go(func() { dst = k.verifyEnd(ctx, req.MigrationID, attest.RoleDestination, req.Destination, true) })
	wg.Go(func() { tenant, tenantVer, tErr = k.loadTenant(ctx, req.Tenant) })
	wg.Go(func() { guestVer, gErr = k.recs.get(ctx, guestPath(req.Tenant, req.VM), &guest) })
	wg.Go(func() { cErr = k.claimMigrationID(ctx, req.MigrationID, req.Tenant, req.VM, true) })
	wg.Wait()
	timings.Verify = time.Since(start)
	// A replay is named as such, whatever its evidence.
	if err := errors.Join(n1, n2); err != nil {
		return nil, err
	}
	if err := errors.Join(src.err, dst.err); err != nil {
		for _, e := range []error{src.err, dst.err} {
			if e != nil {
				ev.Reasons = append(ev.Reasons, e.Error())
			}
		}
		return nil, err
	}
	if cErr != nil {
		ev.Reasons = append(ev.Reasons, cErr.Error())
		return nil, cErr
	}
	if err := errors.Join(tErr, gErr); err != nil {
		return nil, err
	}
	if guestVer == 0 || guest.Epoch == 0 {
		return nil, fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrNotAdopted)
	}
	if m := guest.Migration; m != nil {
		if m.ID == req.MigrationID && m.State == stateReleased {
			return k.releaseAgain(ctx, req, &guest, guestVer, tenant, tenantVer, src.claims, dst.claims, ev, timings)
		}
		return nil, fmt.Errorf("%s/%s has migration %s %s: %w", req.Tenant, req.VM, m.ID, m.State, ErrGuestBusy)
	}
	if guest.LastMigration == req.MigrationID {
		return nil, fmt.Errorf("migration %s of %s/%s has already ended: %w", req.MigrationID, req.Tenant, req.VM, ErrInvalidRequest)
	}

	endpoint, err := dataEndpoint(dst.claims)
	if err != nil {
		ev.Reasons = append(ev.Reasons, err.Error())
		return nil, err
	}
	start = time.Now()
	dec, err := k.decide(req.Policy, tenant, PolicyInput{
		Tenant: req.Tenant, VM: req.VM, Source: src.claims, Destination: dst.claims, Host: req.DestinationHost,
	}, ev)
	timings.Evaluate = time.Since(start)
	if err != nil {
		return nil, err
	}

	start = time.Now()
	if err := k.acceptSVN(ctx, req.Tenant, tenant, tenantVer, dec.SVN); err != nil {
		return nil, err
	}
	from, to := guest.Epoch, guest.Epoch+1
	ev.Epoch = to
	m := &migrationRecord{
		ID: req.MigrationID, State: stateReleasing, FromEpoch: from, ToEpoch: to,
		Policy:          receipt.PolicyRef{Digest: dec.Digest, SVN: dec.SVN},
		Source:          receipt.Summarize(src.claims),
		Destination:     receipt.Summarize(dst.claims),
		CleanMemory:     json.RawMessage(dst.claims.Statement),
		ReleasedAt:      k.now().UTC(),
		DestinationHost: req.DestinationHost.Name,
		SourceKey:       keyDigest(req.Source.Evidence.HPKEPublicKey),
		DestinationKey:  keyDigest(req.Destination.Evidence.HPKEPublicKey),
		SignedPolicy:    req.Policy,
	}
	guest.Migration = m
	epochKey, migKey := epochKeyName(req.Tenant, req.VM, to), migrationKeyName(req.MigrationID)
	cleanup := &journalEntry{
		Kind: kindCleanup, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM,
		Keys: []string{migKey, epochKey}, Epoch: to,
	}
	// Reserve the guest, and meanwhile create both keys and draw MDK_{e+1} and TK from them:
	// each data key waits only for its own key, not for the reservation. A release that loses
	// the reservation to a concurrent one clears what it drew, seals nothing, and destroys
	// only its migration key: the cleanup leaves an epoch key alone while another migration
	// holds the guest.
	var tk, mdk []byte
	defer func() { clear(tk); clear(mdk) }()
	var wrappedMDK, wrappedTK string
	var rErr, e1, e2 error
	var wg2 sync.WaitGroup
	wg2.Go(func() { guestVer, rErr = k.recs.put(ctx, guestPath(req.Tenant, req.VM), &guest, guestVer) })
	wg2.Go(func() {
		if e1 = k.keys.createKey(ctx, epochKey, "aes256-gcm96"); e1 == nil {
			mdk, wrappedMDK, e1 = k.keys.dataKey(ctx, epochKey)
		}
	})
	wg2.Go(func() {
		if e2 = k.keys.createKey(ctx, migKey, "aes256-gcm96"); e2 == nil {
			tk, wrappedTK, e2 = k.keys.dataKey(ctx, migKey)
		}
	})
	wg2.Wait()
	if rErr != nil {
		k.abandonRelease(ctx, cleanup)
		if errors.Is(rErr, errConflict) {
			return nil, fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrGuestBusy)
		}
		return nil, rErr
	}

	// From here on, the guest is reserved and keys may exist: any failure destroys them.
	resp, err := func() (*kbwire.ReleaseResponse, error) {
		if err := errors.Join(e1, e2); err != nil {
			return nil, err
		}
		vaultTime := time.Since(start)

		// Seal both key sets while Vault records the release.
		m.State, m.WrappedTK, m.WrappedMDK = stateReleased, wrappedTK, wrappedMDK
		var sealedSrc, sealedDst []byte
		var e3 error
		var putTime time.Duration
		var wg sync.WaitGroup
		wg.Go(func() {
			start := time.Now()
			if _, e3 = k.recs.put(ctx, guestPath(req.Tenant, req.VM), &guest, guestVer); errors.Is(e3, errConflict) {
				e3 = fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrGuestBusy)
			}
			putTime = time.Since(start)
		})
		var signed []byte
		var signTime time.Duration
		wg.Go(func() {
			start := time.Now()
			sealedSrc, e1 = seal.Seal(req.Source.Evidence.HPKEPublicKey, req.MigrationID, attest.RoleSource, &seal.Keys{TK: tk})
			if e1 == nil {
				sealedDst, e2 = seal.Seal(req.Destination.Evidence.HPKEPublicKey, req.MigrationID, attest.RoleDestination, &seal.Keys{TK: tk, MDK: mdk, Epoch: to})
			}
			timings.Seal = time.Since(start)
			if e1 == nil && e2 == nil {
				start = time.Now()
				signed, e2 = k.signGrant(ctx, releaseGrant(req, from, to, endpoint, dec, sealedSrc, sealedDst))
				if e2 == nil {
					logStart := time.Now()
					_, e2 = k.logDecision(ctx, releaseEntry(req, from, to, signed, ev), false)
					timings.Log = time.Since(logStart)
				}
				signTime = time.Since(start)
			}
		})
		wg.Wait()
		clear(tk)
		clear(mdk)
		timings.Vault = vaultTime + max(putTime, signTime)
		if err := errors.Join(e1, e2, e3); err != nil {
			return nil, err
		}
		return &kbwire.ReleaseResponse{
			MigrationID: req.MigrationID, FromEpoch: from, ToEpoch: to,
			SealedSource: sealedSrc, SealedDestination: sealedDst, WrappedMDK: wrappedMDK,
			PolicyDigest: dec.Digest, PolicySVN: dec.SVN, ZeroPageElision: dec.ZeroPageElision, MaxDowntime: dec.MaxDowntime,
			Grant: signed, DataEndpoint: endpoint, Timings: timings,
		}, nil
	}()
	if err != nil {
		k.abandonRelease(ctx, cleanup)
		return nil, err
	}
	return resp, nil
}

// releaseAgain answers a repeated release of a migration whose keys were released already
// (the broker reruns its attestation step after a crash, with new nonces, new evidence and
// new HPKE keys). The evidence was verified and the nonces consumed like a first release's;
// the policy is evaluated again on the new claims; then the migration's existing TK and
// MDK_{e+1} are unwrapped (Transit decrypt) and sealed to the new keys. Nothing is created,
// and a failure destroys nothing: the migration stays released, its keys with it. The
// migration record takes the new evidence and policy, which its receipt will quote.
//
// The destination must be the host the keys were first released to: a repeated release
// re-keys the same two ends, it never adds a third.
func (k *Keybroker) releaseAgain(ctx context.Context, req *kbwire.ReleaseRequest, guest *guestRecord, guestVer int, tenant *tenantRecord, tenantVer int, src, dst *attest.Claims, ev *Event, timings kbwire.ReleaseTimings) (*kbwire.ReleaseResponse, error) {
	m := guest.Migration
	if m.DestinationHost != req.DestinationHost.Name {
		return nil, fmt.Errorf("migration %s was released to host %q, not %q: %w", m.ID, m.DestinationHost, req.DestinationHost.Name, ErrGuestBusy)
	}
	start := time.Now()
	dec, err := k.decide(req.Policy, tenant, PolicyInput{
		Tenant: req.Tenant, VM: req.VM, Source: src, Destination: dst, Host: req.DestinationHost,
	}, ev)
	timings.Evaluate = time.Since(start)
	if err != nil {
		return nil, err
	}
	start = time.Now()
	if err := k.acceptSVN(ctx, req.Tenant, tenant, tenantVer, dec.SVN); err != nil {
		return nil, err
	}
	ev.Epoch = m.ToEpoch
	var tk, mdk []byte
	defer func() { clear(tk); clear(mdk) }()
	var e1, e2 error
	var wg sync.WaitGroup
	wg.Go(func() { tk, e1 = k.keys.decrypt(ctx, migrationKeyName(m.ID), m.WrappedTK) })
	wg.Go(func() { mdk, e2 = k.keys.decrypt(ctx, epochKeyName(req.Tenant, req.VM, m.ToEpoch), m.WrappedMDK) })
	wg.Wait()
	if err := errors.Join(e1, e2); err != nil {
		return nil, fmt.Errorf("unwrapping the keys of migration %s: %w", m.ID, err)
	}
	timings.Vault = time.Since(start)

	start = time.Now()
	sealedSrc, err := seal.Seal(req.Source.Evidence.HPKEPublicKey, m.ID, attest.RoleSource, &seal.Keys{TK: tk})
	if err != nil {
		return nil, err
	}
	sealedDst, err := seal.Seal(req.Destination.Evidence.HPKEPublicKey, m.ID, attest.RoleDestination, &seal.Keys{TK: tk, MDK: mdk, Epoch: m.ToEpoch})
	if err != nil {
		return nil, err
	}
	clear(tk)
	clear(mdk)
	timings.Seal = time.Since(start)
	endpoint, err := dataEndpoint(dst)
	if err != nil {
		ev.Reasons = append(ev.Reasons, err.Error())
		return nil, err
	}
	start = time.Now()
	signed, err := k.signGrant(ctx, releaseGrant(req, m.FromEpoch, m.ToEpoch, endpoint, dec, sealedSrc, sealedDst))
	if err != nil {
		return nil, err
	}
	if _, err := k.logDecision(ctx, releaseEntry(req, m.FromEpoch, m.ToEpoch, signed, ev), false); err != nil {
		return nil, err
	}
	timings.Vault += time.Since(start)

	// Record the new ends before handing their keys out.
	start = time.Now()
	m.Policy = receipt.PolicyRef{Digest: dec.Digest, SVN: dec.SVN}
	m.Source, m.Destination = receipt.Summarize(src), receipt.Summarize(dst)
	m.SourceKey, m.DestinationKey = keyDigest(req.Source.Evidence.HPKEPublicKey), keyDigest(req.Destination.Evidence.HPKEPublicKey)
	m.CleanMemory = json.RawMessage(dst.Statement)
	m.SignedPolicy = req.Policy
	if _, err := k.recs.put(ctx, guestPath(req.Tenant, req.VM), guest, guestVer); err != nil {
		if errors.Is(err, errConflict) {
			return nil, fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrGuestBusy)
		}
		return nil, err
	}
	timings.Vault += time.Since(start)
	return &kbwire.ReleaseResponse{
		MigrationID: m.ID, FromEpoch: m.FromEpoch, ToEpoch: m.ToEpoch,
		SealedSource: sealedSrc, SealedDestination: sealedDst, WrappedMDK: m.WrappedMDK,
		PolicyDigest: dec.Digest, PolicySVN: dec.SVN, ZeroPageElision: dec.ZeroPageElision, MaxDowntime: dec.MaxDowntime,
		Grant: signed, DataEndpoint: endpoint, Timings: timings,
	}, nil
}

// keyDigest is the SHA-256 of an HPKE public key.
func keyDigest(pub []byte) []byte {
	d := sha256.Sum256(pub)
	return d[:]
}

// dataEndpoint returns the data endpoint the destination's verified clean-memory statement
// names: the only address a grant sends the source to, whatever the broker says. It returns
// ErrEvidenceRejected when the statement names none.
func dataEndpoint(dst *attest.Claims) (string, error) {
	st, err := attest.ParseCleanMemoryStatement(dst.Statement)
	if err != nil {
		return "", fmt.Errorf("destination evidence: %w: %w", ErrEvidenceRejected, err)
	}
	if st.DataEndpoint == "" {
		return "", fmt.Errorf("destination evidence: %w: its clean-memory statement names no data endpoint", ErrEvidenceRejected)
	}
	return st.DataEndpoint, nil
}

// releaseGrant is the statement of a release of req's keys: both ends as verified, the blobs
// sealed for each, the endpoint the destination attested.
func releaseGrant(req *kbwire.ReleaseRequest, from, to uint64, endpoint string, dec *PolicyDecision, sealedSrc, sealedDst []byte) *grant.Grant {
	return &grant.Grant{
		Op: grant.OpRelease, MigrationID: req.MigrationID, Tenant: req.Tenant, VM: req.VM,
		FromEpoch: from, ToEpoch: to,
		Source:       grant.NewEnd(req.SourceHost, req.Source.Evidence, req.Source.Nonce, sealedSrc),
		Destination:  grant.NewEnd(req.DestinationHost.Name, req.Destination.Evidence, req.Destination.Nonce, sealedDst),
		DataEndpoint: endpoint, ZeroPageElision: dec.ZeroPageElision, MaxDowntime: dec.MaxDowntime, PostCopy: dec.PostCopy,
		PolicyDigest: dec.Digest, PolicySVN: dec.SVN,
	}
}

// releaseEntry is the log entry of a release whose grant is signed.
func releaseEntry(req *kbwire.ReleaseRequest, from, to uint64, signed []byte, ev *Event) *tlog.Entry {
	return &tlog.Entry{
		Kind: tlog.KindRelease, Tenant: req.Tenant, VM: req.VM, MigrationID: req.MigrationID,
		FromEpoch: from, ToEpoch: to, Host: req.DestinationHost.Name,
		Statement: tlog.StatementDigest(signed), Evidence: evidenceOf(ev),
	}
}

// signGrant signs g with the keybroker's key (the receipt-signing key in Transit, which
// agents pin).
func (k *Keybroker) signGrant(ctx context.Context, g *grant.Grant) ([]byte, error) {
	pub, err := k.signingKey(ctx)
	if err != nil {
		return nil, err
	}
	g.Kind, g.IssuedAt = grant.Kind, k.now().UTC()
	return grant.Sign(g, pub, func(msg []byte) ([]byte, error) { return k.keys.sign(ctx, ReceiptSigningKey, msg) })
}

// decide runs the policy gate and records the policy's identity and reasons in ev.
func (k *Keybroker) decide(signed []byte, tenant *tenantRecord, in PolicyInput, ev *Event) (*PolicyDecision, error) {
	dec, err := k.policy.Decide(signed, tenant.PolicyKey, tenant.PolicySVN, in)
	if err != nil {
		if errors.Is(err, ErrPolicyRejected) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", ErrPolicyRejected, err)
	}
	ev.PolicyDigest, ev.PolicySVN = dec.Digest, dec.SVN
	if dec.SVN < tenant.PolicySVN {
		return nil, fmt.Errorf("policySvn %d is below the %d accepted last: %w", dec.SVN, tenant.PolicySVN, ErrPolicyRejected)
	}
	if !dec.Allow {
		ev.Reasons = append([]string(nil), dec.Reasons...)
		if len(ev.Reasons) == 0 {
			ev.Reasons = []string{"denied by default"}
		}
		return nil, fmt.Errorf("%w: %s", ErrDenied, strings.Join(ev.Reasons, "; "))
	}
	return dec, nil
}

// abandonRelease destroys the keys of a failed release and clears its reservation, now if
// Vault answers, else through the journal.
func (k *Keybroker) abandonRelease(ctx context.Context, e *journalEntry) {
	ctx = context.WithoutCancel(ctx)
	e.RequestedAt = k.now().UTC()
	if err := k.jnl.add(e); err != nil {
		k.log.ErrorContext(ctx, "Journaling the cleanup of a failed release failed", attrMigration, e.MigrationID, attrError, err.Error())
	}
	if pending := k.jnl.get(kindCleanup, e.MigrationID); pending != nil {
		e = pending
	}
	if err := k.attempt(ctx, e); err != nil {
		k.log.WarnContext(ctx, "Cleanup of a failed release is pending", attrMigration, e.MigrationID, attrError, err.Error())
	}
}
