package keybroker

import (
	"bytes"
	"context"
	"fmt"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// maxHistory bounds the entries of one guest that LogHistory returns.
const maxHistory = 100_000

// logDecision appends the entry of a key decision to the residency log (settle: see
// residencyLog.append). A release, adoption or reissue that cannot be logged fails (its keys
// are destroyed): no key leaves the keybroker without its entry.
func (k *Keybroker) logDecision(ctx context.Context, e *tlog.Entry, settle bool) (uint64, error) {
	e.Time = k.now().UTC()
	return k.rlog.append(ctx, e, settle)
}

// logDenial appends a denial, for a guest of a registered tenant; a failure to log it is
// logged, and the denial stands.
func (k *Keybroker) logDenial(ctx context.Context, ev *Event) {
	if checkGuest(ev.Tenant, ev.VM) != nil || checkID(ev.MigrationID) != nil {
		return
	}
	var t tenantRecord
	if ver, err := k.recs.get(ctx, tenantPath(ev.Tenant), &t); err != nil || ver == 0 {
		return
	}
	e := &tlog.Entry{
		Kind: tlog.KindDeny, Tenant: ev.Tenant, VM: ev.VM, MigrationID: ev.MigrationID,
		Op: string(ev.Kind), Reasons: ev.Reasons, Evidence: evidenceOf(ev),
	}
	if _, err := k.logDecision(ctx, e, true); err != nil {
		k.log.WarnContext(ctx, "Logging a denial in the residency log failed", attrMigration, ev.MigrationID, attrError, err.Error())
	}
}

// evidenceOf returns the digests of the evidence an audit event names.
func evidenceOf(ev *Event) []attest.HexBytes {
	var out []attest.HexBytes
	for _, d := range []attest.HexBytes{ev.SourceEvidence, ev.DestinationEvidence, ev.ErasureEvidence} {
		if len(d) > 0 {
			out = append(out, d)
		}
	}
	return out
}

// LogCheckpoint returns a signed checkpoint of the residency log: the newest (signed now if
// the log grew since the last), or with Witnessed the newest a witness cosigned. It returns
// ErrInvalidRequest (no witnessed checkpoint yet), ErrLogCorrupted, or ErrVaultUnavailable.
func (k *Keybroker) LogCheckpoint(ctx context.Context, req *kbwire.LogCheckpointRequest) (*kbwire.LogCheckpointResponse, error) {
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	cp, err := k.rlog.checkpoint(ctx, 0, req.Witnessed)
	if err != nil {
		return nil, err
	}
	return &kbwire.LogCheckpointResponse{Checkpoint: cp.Note}, nil
}

// LogConsistency returns the proof that the log of req.From entries is a prefix of the log of
// req.To. It returns ErrInvalidRequest (sizes out of order or beyond the log),
// ErrLogCorrupted, or ErrVaultUnavailable.
func (k *Keybroker) LogConsistency(ctx context.Context, req *kbwire.LogConsistencyRequest) (*kbwire.LogConsistencyResponse, error) {
	if req.From > req.To {
		return nil, fmt.Errorf("consistency from %d to %d: %w", req.From, req.To, ErrInvalidRequest)
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	k.rlog.mu.Lock()
	defer k.rlog.mu.Unlock()
	if _, err := k.rlog.syncTree(ctx, req.To); err != nil {
		return nil, err
	}
	p, err := k.rlog.tree.ConsistencyProof(req.From, req.To)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return &kbwire.LogConsistencyResponse{Proof: p}, nil
}

// LogHistory returns a guest's entries, oldest first, each with its inclusion proof against
// one signed checkpoint (the newest, or with Witnessed the newest a witness cosigned; entries
// it does not hold yet are left out). The entries are every entry of the log that names the
// guest, found by reading the log itself, so that a guest record rolled back in Vault hides
// none of them; a broken chain is served as it is, for the tenant's verifier to refuse. A
// guest the log never saw has no entries. It returns ErrInvalidRequest, ErrLogCorrupted, or
// ErrVaultUnavailable.
func (k *Keybroker) LogHistory(ctx context.Context, req *kbwire.LogHistoryRequest) (*tlog.History, error) {
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	cp, err := k.rlog.checkpoint(ctx, 0, req.Witnessed)
	if err != nil {
		return nil, err
	}
	h := &tlog.History{Tenant: req.Tenant, VM: req.VM, Checkpoint: cp.Note}
	k.rlog.mu.Lock()
	defer k.rlog.mu.Unlock()
	if _, err := k.rlog.syncTree(ctx, cp.Size); err != nil {
		return nil, err
	}
	for _, i := range k.rlog.guests[req.Tenant+"/"+req.VM] {
		if i >= cp.Size {
			break
		}
		if len(h.Entries) == maxHistory {
			return nil, fmt.Errorf("%s/%s has more than %d entries: %w", req.Tenant, req.VM, maxHistory, ErrInvalidRequest)
		}
		var rec logEntryRecord
		ver, err := k.recs.get(ctx, logEntryPath(i), &rec)
		if err != nil {
			return nil, fmt.Errorf("reading the residency log: %w", err)
		}
		want, err := k.rlog.tree.LeafHash(i)
		if err != nil {
			return nil, err
		}
		if ver == 0 || !bytes.Equal(tlog.LeafHash(rec.Leaf), want) {
			return nil, fmt.Errorf("%w: entry %d of %s/%s was removed or altered", ErrLogCorrupted, i, req.Tenant, req.VM)
		}
		pe := tlog.ProvenEntry{Index: i, Leaf: rec.Leaf}
		if pe.Proof, err = k.rlog.tree.InclusionProof(i, cp.Size); err != nil {
			return nil, err
		}
		h.Entries = append(h.Entries, pe)
	}
	return h, nil
}

// guestEntries reads a guest's entries, newest to oldest along their Prev links, and returns
// them oldest first, without proofs.
func (k *Keybroker) guestEntries(ctx context.Context, tenant, vm string) ([]tlog.ProvenEntry, error) {
	var g logGuestRecord
	ver, err := k.recs.get(ctx, logGuestPath(tenant, vm), &g)
	if err != nil || ver == 0 {
		return nil, err
	}
	var out []tlog.ProvenEntry
	next := &g.Last
	for next != nil {
		if len(out) == maxHistory {
			return nil, fmt.Errorf("%s/%s has more than %d entries: %w", tenant, vm, maxHistory, ErrInvalidRequest)
		}
		var rec logEntryRecord
		ver, err := k.recs.get(ctx, logEntryPath(next.Index), &rec)
		if err != nil {
			return nil, fmt.Errorf("reading the residency log: %w", err)
		}
		if ver == 0 {
			return nil, fmt.Errorf("%w: entry %d of %s/%s is missing", ErrLogCorrupted, next.Index, tenant, vm)
		}
		e, err := tlog.ParseEntry(rec.Leaf)
		if err != nil {
			return nil, fmt.Errorf("%w: entry %d: %w", ErrLogCorrupted, next.Index, err)
		}
		// A broken link is served as it is: the tenant's verifier says what is wrong.
		out = append(out, tlog.ProvenEntry{Index: next.Index, Leaf: rec.Leaf})
		if e.Tenant != tenant || e.VM != vm || (e.Prev != nil && e.Prev.Index >= next.Index) {
			break
		}
		next = e.Prev
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, nil
}

// receiptInclusion proves the log entry of a migration's ending, which names its receipt.
func (k *Keybroker) receiptInclusion(ctx context.Context, tenant, vm, migrationID string) (*tlog.Inclusion, error) {
	entries, err := k.guestEntries(ctx, tenant, vm)
	if err != nil {
		return nil, err
	}
	for i := len(entries) - 1; i >= 0; i-- {
		e, err := tlog.ParseEntry(entries[i].Leaf)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrLogCorrupted, err)
		}
		if e.MigrationID != migrationID || (e.Kind != tlog.KindCommit && e.Kind != tlog.KindAbort) {
			continue
		}
		pe := entries[i]
		cp, err := k.rlog.covering(ctx, pe.Index+1)
		if err != nil {
			return nil, err
		}
		k.rlog.mu.Lock()
		defer k.rlog.mu.Unlock()
		if _, err := k.rlog.syncTree(ctx, cp.Size); err != nil {
			return nil, err
		}
		if pe.Proof, err = k.rlog.tree.InclusionProof(pe.Index, cp.Size); err != nil {
			return nil, err
		}
		return &tlog.Inclusion{Checkpoint: cp.Note, Entry: pe}, nil
	}
	return nil, fmt.Errorf("no log entry for the ending of migration %s: %w", migrationID, ErrUnknownMigration)
}

// LogCosign adds a witness's cosignature to a checkpoint the log signed; only witnesses in
// Config.LogWitnesses are taken. It returns ErrInvalidRequest, ErrLogCorrupted, or
// ErrVaultUnavailable.
func (k *Keybroker) LogCosign(ctx context.Context, req *kbwire.LogCosignRequest) (*kbwire.LogCheckpointResponse, error) {
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	cp, err := k.rlog.cosign(ctx, req.Checkpoint)
	if err != nil {
		return nil, err
	}
	return &kbwire.LogCheckpointResponse{Checkpoint: cp.Note}, nil
}

// LogOrigin returns the residency log's origin: its name in checkpoints, which a verifier
// needs beside the keybroker's public key.
func (k *Keybroker) LogOrigin() string { return k.rlog.origin }
