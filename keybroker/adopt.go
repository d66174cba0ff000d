package keybroker

import (
	"context"
	"errors"
	"fmt"

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
// Caveat: the policy decides which platforms may hold the key, not which host the guest is
// on; the broker, which knows where the guest runs, must only forward requests of that host's
// agent.
//
// It returns ErrInvalidRequest; the nonce errors; ErrEvidenceRejected; ErrUnknownTenant;
// ErrNotAdopted; ErrPolicyRejected; ErrDenied; or ErrVaultUnavailable.
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
		if ver == 0 || g.Epoch == 0 || g.WrappedMDK == "" {
			return fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrNotAdopted)
		}
		if g.Migration != nil && g.Migration.State == stateForgetting {
			return fmt.Errorf("%s/%s is being forgotten: %w", req.Tenant, req.VM, ErrNotAdopted)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	g, dec := a.guest, a.decision
	ev.Epoch = g.Epoch
	mdk, err := k.keys.decrypt(ctx, epochKeyName(req.Tenant, req.VM, g.Epoch), g.WrappedMDK)
	if err != nil {
		return nil, err
	}
	sealed, err := seal.Seal(req.Agent.Evidence.HPKEPublicKey, req.ReissueID, attest.RoleAdopt, &seal.Keys{MDK: mdk, Epoch: g.Epoch})
	clear(mdk)
	if err != nil {
		return nil, err
	}
	signed, err := k.signGrant(ctx, agentGrant(grant.OpReissue, r, g.Epoch, g.Epoch, dec, sealed))
	if err != nil {
		return nil, err
	}
	if _, err := k.logDecision(ctx, grantEntry(tlog.KindReissue, r, g.Epoch, g.Epoch, signed, ev), false); err != nil {
		return nil, err
	}
	return &kbwire.ReissueResponse{Epoch: g.Epoch, Sealed: sealed, PolicyDigest: dec.Digest, PolicySVN: dec.SVN, Grant: signed}, nil
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
