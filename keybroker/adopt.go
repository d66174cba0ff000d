package keybroker

import (
	"context"
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
)

// Adopt starts a guest's first residency: if the tenant's policy accepts the agent's host as
// a destination, it creates the epoch-1 key, draws MDK_1 and seals it to the agent (seal role
// "adopt"). Every later epoch comes only from a migration. It emits one audit event.
//
// It returns ErrInvalidRequest; ErrNonceUnknown, ErrNonceExpired or ErrNonceUsed;
// ErrEvidenceRejected; ErrUnknownTenant; ErrAlreadyAdopted; ErrGuestBusy; ErrPolicyRejected;
// ErrDenied; or ErrVaultUnavailable (nothing released; a created key is destroyed).
func (k *Keybroker) Adopt(ctx context.Context, req *AdoptRequest) (*AdoptResponse, error) {
	ev := Event{Kind: EventAdopt, MigrationID: req.AdoptionID, Tenant: req.Tenant, VM: req.VM}
	if e := req.Agent.Evidence; e != nil {
		d := e.Digest()
		ev.DestinationEvidence = d[:]
	}
	resp, err := k.adopt(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("adopting %s/%s: %w", req.Tenant, req.VM, err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) adopt(ctx context.Context, req *AdoptRequest, ev *Event) (*AdoptResponse, error) {
	if err := checkID(req.AdoptionID); err != nil {
		return nil, err
	}
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if err := k.nonces.consume(req.AdoptionID, attest.RoleAdopt, req.Agent.Nonce); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	v := k.verifyEnd(ctx, req.AdoptionID, attest.RoleAdopt, req.Agent, true)
	if v.err != nil {
		ev.Reasons = []string{v.err.Error()}
		return nil, v.err
	}
	tenant, tenantVer, err := k.loadTenant(ctx, req.Tenant)
	if err != nil {
		return nil, err
	}
	path := guestPath(req.Tenant, req.VM)
	var g guestRecord
	ver, err := k.recs.get(ctx, path, &g)
	if err != nil {
		return nil, err
	}
	if ver != 0 && (g.Epoch != 0 || g.Migration != nil) {
		return nil, fmt.Errorf("%s/%s is in epoch %d: %w", req.Tenant, req.VM, g.Epoch, ErrAlreadyAdopted)
	}
	dec, err := k.decide(req.Policy, tenant, PolicyInput{Tenant: req.Tenant, VM: req.VM, Destination: v.claims, Host: req.Host}, ev)
	if err != nil {
		return nil, err
	}
	if err := k.acceptSVN(ctx, req.Tenant, tenant, tenantVer, dec.SVN); err != nil {
		return nil, err
	}
	ev.Epoch = 1
	g = guestRecord{Migration: &migrationRecord{
		ID: req.AdoptionID, State: stateReleasing, ToEpoch: 1,
		Policy:      receipt.PolicyRef{Digest: dec.Digest, SVN: dec.SVN},
		Destination: receipt.Summarize(v.claims), ReleasedAt: k.now().UTC(),
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
	resp, err := func() (*AdoptResponse, error) {
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
		g = guestRecord{Epoch: 1, WrappedMDK: wrapped}
		if _, err := k.recs.put(ctx, path, &g, ver); err != nil {
			return nil, err
		}
		return &AdoptResponse{Epoch: 1, Sealed: sealed, WrappedMDK: wrapped, PolicyDigest: dec.Digest, PolicySVN: dec.SVN}, nil
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
func (k *Keybroker) Reissue(ctx context.Context, req *ReissueRequest) (*ReissueResponse, error) {
	ev := Event{Kind: EventReissue, MigrationID: req.ReissueID, Tenant: req.Tenant, VM: req.VM}
	if e := req.Agent.Evidence; e != nil {
		d := e.Digest()
		ev.DestinationEvidence = d[:]
	}
	resp, err := k.reissue(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("reissuing the key of %s/%s: %w", req.Tenant, req.VM, err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) reissue(ctx context.Context, req *ReissueRequest, ev *Event) (*ReissueResponse, error) {
	if err := checkID(req.ReissueID); err != nil {
		return nil, err
	}
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if err := k.nonces.consume(req.ReissueID, attest.RoleAdopt, req.Agent.Nonce); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	v := k.verifyEnd(ctx, req.ReissueID, attest.RoleAdopt, req.Agent, true)
	if v.err != nil {
		ev.Reasons = []string{v.err.Error()}
		return nil, v.err
	}
	tenant, tenantVer, err := k.loadTenant(ctx, req.Tenant)
	if err != nil {
		return nil, err
	}
	var g guestRecord
	ver, err := k.recs.get(ctx, guestPath(req.Tenant, req.VM), &g)
	if err != nil {
		return nil, err
	}
	if ver == 0 || g.Epoch == 0 || g.WrappedMDK == "" {
		return nil, fmt.Errorf("%s/%s: %w", req.Tenant, req.VM, ErrNotAdopted)
	}
	dec, err := k.decide(req.Policy, tenant, PolicyInput{Tenant: req.Tenant, VM: req.VM, Destination: v.claims, Host: req.Host}, ev)
	if err != nil {
		return nil, err
	}
	if err := k.acceptSVN(ctx, req.Tenant, tenant, tenantVer, dec.SVN); err != nil {
		return nil, err
	}
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
	return &ReissueResponse{Epoch: g.Epoch, Sealed: sealed, PolicyDigest: dec.Digest, PolicySVN: dec.SVN}, nil
}
