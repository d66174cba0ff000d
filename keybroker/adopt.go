package keybroker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// Adopt starts a guest's first residency: if the tenant's policy accepts the agent's host as
// a destination, it creates the epoch-1 key, draws MDK_1 and seals it to the agent (seal role
// "adopt"). Every later epoch comes only from a migration. It emits one audit event.
//
// It returns ErrInvalidRequest; ErrNonceUnknown, ErrNonceExpired or ErrNonceUsed;
// ErrEvidenceRejected; ErrUnknownTenant; ErrAlreadyAdopted; ErrGuestBusy; ErrPolicyRejected;
// ErrDenied; or ErrVaultUnavailable (nothing released; a created key is destroyed).
func (k *Keybroker) Adopt(ctx context.Context, req *kbwire.AdoptRequest) (*kbwire.AdoptResponse, error) {
	ev := agentEvent(EventAdopt, req.AdoptionID, req.Tenant, req.VM, req.Agent)
	resp, err := k.adopt(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("adopting %s/%s: %w", req.Tenant, req.VM, err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) adopt(ctx context.Context, req *kbwire.AdoptRequest, ev *Event) (*kbwire.AdoptResponse, error) {
	r := agentRequest{id: req.AdoptionID, tenant: req.Tenant, vm: req.VM, policy: req.Policy, agent: req.Agent, host: req.Host}
	a, err := k.admitAgent(ctx, r, ev, func(ver int, g *guestRecord) error {
		if ver != 0 && (g.Epoch != 0 || g.Migration != nil) {
			return fmt.Errorf("%s/%s is in epoch %d: %w", req.Tenant, req.VM, g.Epoch, ErrAlreadyAdopted)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	path, ver, dec := guestPath(req.Tenant, req.VM), a.guestVer, a.decision
	ev.Epoch = 1
	g := guestRecord{Migration: &migrationRecord{
		ID: req.AdoptionID, State: stateReleasing, ToEpoch: 1,
		Policy:      receipt.PolicyRef{Digest: dec.Digest, SVN: dec.SVN},
		Destination: receipt.Summarize(a.claims), ReleasedAt: k.now().UTC(),
	}}
	epochKey := epochKeyName(req.Tenant, req.VM, 1)
	cleanup := &journalEntry{Kind: kindCleanup, MigrationID: req.AdoptionID, Tenant: req.Tenant, VM: req.VM, Keys: []string{epochKey}, Epoch: 1}
	if ver, err = k.recs.put(ctx, path, &g, ver); err != nil {
		if errors.Is(err, errConflict) {
			return nil, fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrGuestBusy)
		}
		k.abandonRelease(ctx, cleanup)
		return nil, err
	}
	resp, err := func() (*kbwire.AdoptResponse, error) {
		if err := k.keys.createKey(ctx, epochKey, "aes256-gcm96"); err != nil {
			return nil, err
		}
		mdk, wrapped, err := k.keys.dataKey(ctx, epochKey)
		if err != nil {
			return nil, err
		}
		sealed, err := seal.Seal(req.Agent.Evidence.HPKEPublicKey, req.AdoptionID, attest.RoleAdopt, &seal.Keys{MDK: mdk, Epoch: 1})
		clear(mdk)
		if err != nil {
			return nil, err
		}
		signed, err := k.signGrant(ctx, agentGrant(grant.OpAdopt, r, 0, 1, dec, sealed))
		if err != nil {
			return nil, err
		}
		if _, err := k.logDecision(ctx, grantEntry(tlog.KindAdopt, r, 0, 1, signed, ev), false); err != nil {
			return nil, err
		}
		g = guestRecord{Epoch: 1, WrappedMDK: wrapped}
		if _, err := k.recs.put(ctx, path, &g, ver); err != nil {
			return nil, err
		}
		return &kbwire.AdoptResponse{Epoch: 1, Sealed: sealed, WrappedMDK: wrapped, PolicyDigest: dec.Digest, PolicySVN: dec.SVN, Grant: signed}, nil
	}()
	if err != nil {
		k.abandonRelease(ctx, cleanup)
		return nil, err
	}
	return resp, nil
}

// Reissue gives an agent that restarted the MDK of the guest's current epoch again: it
// verifies the agent's fresh evidence (role "adopt"), evaluates the tenant's policy on it as
// for an adoption, unwraps the guest's wrapped MDK with the epoch key (Transit decrypt) and
// seals it to the agent. Nothing is created. It emits one audit event.
//
// From before it unwraps the MDK until its log entry is written it holds the guest's record
// (reissueMarker): no forget or commit ends the epoch meanwhile, so that its entry never
// follows theirs in the guest's history.
//
// Caveat: the policy decides which platforms may hold the key, not which host the guest is
// on; the broker, which knows where the guest runs, must only forward requests of that host's
// agent.
//
// It returns ErrInvalidRequest; the nonce errors; ErrEvidenceRejected; ErrUnknownTenant;
// ErrNotAdopted (also while the guest is being forgotten); ErrGuestBusy (another reissue holds
// the guest, a commit of it is being logged, or its record changed meanwhile);
// ErrPolicyRejected; ErrDenied; or ErrVaultUnavailable.
func (k *Keybroker) Reissue(ctx context.Context, req *kbwire.ReissueRequest) (*kbwire.ReissueResponse, error) {
	ev := agentEvent(EventReissue, req.ReissueID, req.Tenant, req.VM, req.Agent)
	resp, err := k.reissue(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("reissuing the key of %s/%s: %w", req.Tenant, req.VM, err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) reissue(ctx context.Context, req *kbwire.ReissueRequest, ev *Event) (*kbwire.ReissueResponse, error) {
	r := agentRequest{id: req.ReissueID, tenant: req.Tenant, vm: req.VM, policy: req.Policy, agent: req.Agent, host: req.Host}
	a, err := k.admitAgent(ctx, r, ev, func(ver int, g *guestRecord) error {
		return reissuable(req.Tenant, req.VM, ver, g, k.now())
	})
	if err != nil {
		return nil, err
	}
	g, dec := a.guest, a.decision
	ev.Epoch = g.Epoch
	// The marker holds for reissueHold; all that follows it, up to the log entry, ends well
	// before (reissueWindow).
	wctx, cancel := context.WithTimeout(ctx, reissueWindow)
	defer cancel()
	ver, err := k.markReissue(wctx, req.ReissueID, req.Tenant, req.VM, a.guestVer, &g)
	if err != nil {
		return nil, err
	}
	logging := false
	resp, err := func() (*kbwire.ReissueResponse, error) {
		mdk, err := k.keys.decrypt(wctx, epochKeyName(req.Tenant, req.VM, g.Epoch), g.WrappedMDK)
		if err != nil {
			return nil, err
		}
		sealed, err := seal.Seal(req.Agent.Evidence.HPKEPublicKey, req.ReissueID, attest.RoleAdopt, &seal.Keys{MDK: mdk, Epoch: g.Epoch})
		clear(mdk)
		if err != nil {
			return nil, err
		}
		signed, err := k.signGrant(wctx, agentGrant(grant.OpReissue, r, g.Epoch, g.Epoch, dec, sealed))
		if err != nil {
			return nil, err
		}
		logging = true
		if _, err := k.logDecision(wctx, grantEntry(tlog.KindReissue, r, g.Epoch, g.Epoch, signed, ev), false); err != nil {
			return nil, err
		}
		return &kbwire.ReissueResponse{Epoch: g.Epoch, Sealed: sealed, PolicyDigest: dec.Digest, PolicySVN: dec.SVN, Grant: signed}, nil
	}()
	// An entry whose append failed may still be written (append): its marker then lapses.
	if err == nil || !logging {
		k.unmarkReissue(ctx, req.ReissueID, req.Tenant, req.VM, ver, &g)
	}
	return resp, err
}

// A reissue's marker lapses by itself, so that a keybroker that dies holding one blocks its
// guest's forget or commit for reissueHold at most.
const (
	// reissueWindow bounds a reissue from its marker to its log entry (its context's
	// deadline): the residency log writes the entry before reissueWindow + finishTimeout, or
	// never.
	reissueWindow = 20 * time.Second
	// reissueSlack is what a marker holds beyond that: the minute of clock skew tolerated
	// between keybrokers (as for nonces), and ten seconds for a write still on its way to
	// Vault.
	reissueSlack = time.Minute + 10*time.Second
	// reissueHold is how long a marker holds.
	reissueHold = reissueWindow + finishTimeout + reissueSlack
	// maxMarkAttempts bounds how often a reissue reads its guest's record again when a write
	// of another changed it between its read and its own.
	maxMarkAttempts = 4
	// unmarkTimeout bounds the clearing of a marker, which goes on after the request's end.
	unmarkTimeout = 5 * time.Second
)

// reissueMarker, in a guest's record, says that reissue ID holds the guest's live epoch until
// Until (by the clock of the keybroker that wrote it): it unwraps the epoch's MDK and logs its
// reissue entry meanwhile. No entry that ends the epoch may be logged while it holds: the
// reissue's entry could then come after it, and the guest's history would fail its tenant's
// check (a reissue of an epoch no longer live), a false alarm of tampering that anyone who can
// restart an agent at the right moment could raise, across any number of keybrokers.
//
// Every write of a guest's record is a check-and-set on the version read, so each of the
// following comes wholly before or after a reissue R's marker. Against a forget F:
//   - R marks before F reads the record: F is refused (ErrGuestBusy), its statement unspent;
//     if F read it before, its hold (executeForget) reads again and is refused likewise, its
//     statement spent, as for a release that races a forget.
//   - F reads the record, R marks, F writes its hold: F's check-and-set fails, F is refused
//     (ErrGuestBusy).
//   - F holds (stateForgetting) before R marks: R's check-and-set fails and R, reading again,
//     is refused (ErrNotAdopted) before it unwraps anything; an R that reads after the hold is
//     refused when admitted.
//   - R's marker lapsed (its keybroker died, or was slower than reissueHold): F goes on. R's
//     entry, if any, was sent to Vault before Until - reissueSlack by R's clock (append), so
//     before F's hold while the keybrokers' clocks, and Vault's delay, stay within the slack.
//
// A commit C (executeDestroy, moving the guest to epoch e+1) is held off the same way, refused
// with the journal retrying it (ErrGuestBusy) until the marker is cleared or lapses. And R is
// refused (ErrGuestBusy) while the record says committed: the guest is in epoch e+1 there but
// in epoch e in the log until C's entry is written. Of two reissues only one marks; the other
// is refused (ErrGuestBusy) while it holds.
//
// A release, a repeated release, an abort and a cleanup end no epoch: their entries may come
// before or after R's, and they carry the marker along in the record they write. R reads again
// when one of their writes beats its mark or its clearing; one of them whose check-and-set R's
// mark or clearing beats is refused or retried as for any concurrent write (a release:
// ErrGuestBusy, a journaled ending: retried). An adoption needs
// a guest in epoch 0, which no reissue marks, and a completed forget writes a record without a
// marker.
type reissueMarker struct {
	ID    string    `json:"id"`
	Until time.Time `json:"until"`
}

// holds says whether m (nil: none) still holds at now.
func (m *reissueMarker) holds(now time.Time) bool { return m != nil && now.Before(m.Until) }

// reissuable returns why the guest, whose record (version ver) is g, may not have its key
// reissued at now, or nil: it must be adopted, not being forgotten, not moving to the next
// epoch (a commit not logged yet) and not held by another reissue.
func reissuable(tenant, vm string, ver int, g *guestRecord, now time.Time) error {
	m := g.Migration
	switch {
	case ver == 0 || g.Epoch == 0 || g.WrappedMDK == "":
		return fmt.Errorf("%s/%s: %w", tenant, vm, ErrNotAdopted)
	case m != nil && m.State == stateForgetting:
		return fmt.Errorf("%s/%s is being forgotten: %w", tenant, vm, ErrNotAdopted)
	case m != nil && m.State == stateCommitted:
		return fmt.Errorf("%s/%s is moving to epoch %d (migration %s committed): try again once it has: %w", tenant, vm, m.ToEpoch, m.ID, ErrGuestBusy)
	case g.Reissuing.holds(now):
		return fmt.Errorf("%s/%s: reissue %s holds it: %w", tenant, vm, g.Reissuing.ID, ErrGuestBusy)
	}
	return nil
}

// markReissue writes reissue id's marker into the guest's record (version ver, g as admitted)
// and returns the record's new version, g being what it holds. A record that changed meanwhile
// is read again and marked if it is still reissuable in the same epoch with the same MDK. It
// returns ErrNotAdopted, ErrGuestBusy or ErrVaultUnavailable.
func (k *Keybroker) markReissue(ctx context.Context, id, tenant, vm string, ver int, g *guestRecord) (int, error) {
	path := guestPath(tenant, vm)
	epoch, wrapped := g.Epoch, g.WrappedMDK
	for attempt := 1; ; attempt++ {
		now := k.now()
		if err := reissuable(tenant, vm, ver, g, now); err != nil {
			return 0, err
		}
		if g.Epoch != epoch || g.WrappedMDK != wrapped {
			return 0, fmt.Errorf("%s/%s changed while its key was being reissued: %w", tenant, vm, ErrGuestBusy)
		}
		g.Reissuing = &reissueMarker{ID: id, Until: now.Add(reissueHold).UTC()}
		next, err := k.recs.put(ctx, path, g, ver)
		switch {
		case err == nil:
			return next, nil
		case !errors.Is(err, errConflict):
			return 0, err
		case attempt == maxMarkAttempts:
			return 0, fmt.Errorf("%s/%s keeps changing: %w", tenant, vm, ErrGuestBusy)
		}
		*g = guestRecord{}
		if ver, err = k.recs.get(ctx, path, g); err != nil {
			return 0, err
		}
	}
}

// unmarkReissue clears reissue id's marker from the guest's record (version ver, g as
// markReissue wrote it), reading the record again if it changed. A failure is logged: the
// marker then lapses at its Until.
func (k *Keybroker) unmarkReissue(ctx context.Context, id, tenant, vm string, ver int, g *guestRecord) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unmarkTimeout)
	defer cancel()
	path := guestPath(tenant, vm)
	for attempt := 1; ; attempt++ {
		if ver == 0 || g.Reissuing == nil || g.Reissuing.ID != id {
			return
		}
		g.Reissuing = nil
		_, err := k.recs.put(ctx, path, g, ver)
		if err == nil {
			return
		}
		if errors.Is(err, errConflict) && attempt < maxMarkAttempts {
			*g = guestRecord{}
			if ver, err = k.recs.get(ctx, path, g); err == nil {
				continue
			}
		}
		k.log.WarnContext(ctx, "Clearing a reissue's hold on its guest failed; the hold lapses by itself", attrMigration, id, attrTenant, tenant, attrVM, vm, attrError, err.Error())
		return
	}
}

// agentRequest is what an adoption and a reissue have in common: one agent, attesting in role
// "adopt", asks for the MDK of a guest's epoch on its host.
type agentRequest struct {
	id, tenant, vm string
	policy         []byte
	agent          kbwire.Attestation
	host           kbwire.Host
}

// agentGrant is the statement of an adoption or a reissue: MDK_to sealed to one agent.
func agentGrant(op grant.Op, r agentRequest, from, to uint64, dec *PolicyDecision, sealed []byte) *grant.Grant {
	return &grant.Grant{
		Op: op, MigrationID: r.id, Tenant: r.tenant, VM: r.vm, FromEpoch: from, ToEpoch: to,
		Destination:  grant.NewEnd(r.host.Name, r.agent.Evidence, r.agent.Nonce, sealed),
		PolicyDigest: dec.Digest, PolicySVN: dec.SVN,
	}
}

// grantEntry is the log entry of an adoption or a reissue whose grant is signed.
func grantEntry(kind tlog.Kind, r agentRequest, from, to uint64, signed []byte, ev *Event) *tlog.Entry {
	return &tlog.Entry{
		Kind: kind, Tenant: r.tenant, VM: r.vm, MigrationID: r.id, FromEpoch: from, ToEpoch: to,
		Host: r.host.Name, Statement: tlog.StatementDigest(signed), Evidence: evidenceOf(ev),
	}
}

// agentEvent returns the audit event of an adoption or a reissue, before its outcome.
func agentEvent(kind EventKind, id, tenant, vm string, agent kbwire.Attestation) Event {
	ev := Event{Kind: kind, MigrationID: id, Tenant: tenant, VM: vm}
	if e := agent.Evidence; e != nil {
		d := e.Digest()
		ev.DestinationEvidence = d[:]
	}
	return ev
}

// admission is what admitAgent established.
type admission struct {
	claims   *attest.Claims
	guest    guestRecord
	guestVer int
	decision *PolicyDecision
}

// admitAgent runs the checks an adoption and a reissue share, in order: the request's id and
// guest, Vault's login, the agent's nonce, the agent's evidence (a failure is ev's reason),
// the tenant, admissible on the guest's record (its version, 0 when there is none), the
// tenant's policy and its policySvn. It returns the errors of those steps.
func (k *Keybroker) admitAgent(ctx context.Context, r agentRequest, ev *Event, admissible func(ver int, g *guestRecord) error) (*admission, error) {
	if err := checkID(r.id); err != nil {
		return nil, err
	}
	if err := checkGuest(r.tenant, r.vm); err != nil {
		return nil, err
	}
	if err := k.consumeNonce(ctx, r.id, attest.RoleAdopt, r.agent.Nonce); err != nil {
		return nil, err
	}
	if err := k.claimMigrationID(ctx, r.id, r.tenant, r.vm, true); err != nil {
		ev.Reasons = []string{err.Error()}
		return nil, err
	}
	v := k.verifyEnd(ctx, r.id, attest.RoleAdopt, r.agent, true)
	if v.err != nil {
		ev.Reasons = []string{v.err.Error()}
		return nil, v.err
	}
	tenant, tenantVer, err := k.loadTenant(ctx, r.tenant)
	if err != nil {
		return nil, err
	}
	a := &admission{claims: v.claims}
	if a.guestVer, err = k.recs.get(ctx, guestPath(r.tenant, r.vm), &a.guest); err != nil {
		return nil, err
	}
	if err := admissible(a.guestVer, &a.guest); err != nil {
		return nil, err
	}
	if a.decision, err = k.decide(r.policy, tenant, PolicyInput{Tenant: r.tenant, VM: r.vm, Destination: v.claims, Host: r.host}, ev); err != nil {
		return nil, err
	}
	if err := k.acceptSVN(ctx, r.tenant, tenant, tenantVer, a.decision.SVN); err != nil {
		return nil, err
	}
	return a, nil
}
