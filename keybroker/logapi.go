package keybroker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// logDecision appends the entry of a key decision to the residency log (settle: see
// residencyLog.append). A release, adoption or reissue that cannot be logged fails (its keys
// are destroyed): no key leaves the keybroker without its entry.
func (k *Keybroker) logDecision(ctx context.Context, e *tlog.Entry, settle bool) (uint64, error) {
	e.Time = k.now().UTC()
	return k.rlog.append(ctx, e, settle)
}

// denialLogTimeout bounds how long a denial waits for its log entry.
const denialLogTimeout = 5 * time.Second

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
		Kind: tlog.KindDeny, Tenant: ev.Tenant, VM: ev.VM, MigrationID: ev.MigrationID, Host: ev.Host,
		Op: string(ev.Kind), Reasons: ev.Reasons, Evidence: evidenceOf(ev),
	}
	// Written, not settled: the denial's answer waits for one batch at most, and no longer
	// than denialLogTimeout.
	ctx, cancel := context.WithTimeout(ctx, denialLogTimeout)
	defer cancel()
	if _, err := k.logDecision(ctx, e, false); err != nil {
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
	if _, err := k.rlog.syncTree(ctx, req.To); err != nil {
		return nil, err
	}
	k.rlog.mu.Lock()
	defer k.rlog.mu.Unlock()
	p, err := k.rlog.tree.ConsistencyProof(req.From, req.To)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return &kbwire.LogConsistencyResponse{Proof: p}, nil
}

// maxHistoryPage bounds the entries of one LogHistory answer (about 2.5 KB each, under
// NATS's 1 MiB payload).
const maxHistoryPage = 200

// LogHistory returns a guest's entries, oldest first, each with its inclusion proof against
// one signed checkpoint: the newest, with Witnessed the newest a witness cosigned, or with
// Size the stored checkpoint of that size (entries it does not hold yet are left out). It
// answers at most 200 entries from FromSeq on; History.Next, if not 0, is the FromSeq of the
// next page, to ask with Size set to this checkpoint's. The entries are every entry of the
// log that names the guest, found by reading the log itself, so that a guest record rolled
// back in Vault hides none of them; a broken chain is served as it is, for the tenant's
// verifier to refuse. A guest the log never saw has no entries. It returns
// ErrInvalidRequest, ErrLogCorrupted, or ErrVaultUnavailable.
func (k *Keybroker) LogHistory(ctx context.Context, req *kbwire.LogHistoryRequest) (*tlog.History, error) {
	if err := checkGuest(req.Tenant, req.VM); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	var cp *tlog.Signed
	var err error
	if req.Size != 0 {
		cp, err = k.rlog.storedCheckpoint(ctx, req.Size)
		if errors.Is(err, ErrLogCorrupted) {
			err = fmt.Errorf("no checkpoint of size %d: %w", req.Size, ErrInvalidRequest)
		}
	} else {
		cp, err = k.rlog.checkpoint(ctx, 0, req.Witnessed)
	}
	if err != nil {
		return nil, err
	}
	from := max(req.FromSeq, 1) - 1
	page, err := k.rlog.proveGuest(ctx, req.Tenant, req.VM, cp.Size, from, maxHistoryPage)
	if err != nil {
		return nil, err
	}
	h := &tlog.History{Tenant: req.Tenant, VM: req.VM, Checkpoint: cp.Note, Entries: page.entries}
	if page.more {
		h.Next = from + uint64(len(page.entries)) + 1
	}
	return h, nil
}

// receiptInclusion proves the log entry of a migration's ending, which names its receipt:
// the guest's newest commit or abort of that migration. It looks under the head as it is
// first (an ending returns from its append once the head is past it), then under the
// settled head (a retried ending whose append another attempt had written).
func (k *Keybroker) receiptInclusion(ctx context.Context, tenant, vm, migrationID string) (*tlog.Inclusion, error) {
	for _, settle := range []bool{false, true} {
		idx, err := k.rlog.guestIndexes(ctx, tenant, vm, settle)
		if err != nil {
			return nil, err
		}
		for i := len(idx) - 1; i >= 0; i-- {
			var rec logEntryRecord
			if _, err := k.recs.get(ctx, logEntryPath(idx[i]), &rec); err != nil {
				return nil, fmt.Errorf("reading the residency log: %w", err)
			}
			e, err := tlog.ParseEntry(rec.Leaf)
			if err != nil {
				return nil, fmt.Errorf("%w: entry %d: %w", ErrLogCorrupted, idx[i], err)
			}
			if e.MigrationID != migrationID || (e.Kind != tlog.KindCommit && e.Kind != tlog.KindAbort) {
				continue
			}
			cp, err := k.rlog.covering(ctx, idx[i]+1)
			if err != nil {
				return nil, err
			}
			entry, err := k.rlog.proveLeaf(ctx, cp.Size, idx[i], rec.Leaf)
			if err != nil {
				return nil, err
			}
			return &tlog.Inclusion{Checkpoint: cp.Note, Entry: entry}, nil
		}
	}
	return nil, fmt.Errorf("no log entry for the ending of migration %s: %w", migrationID, ErrUnknownMigration)
}

// LogEntries returns leaves [From, To) of the residency log (at most kbwire.MaxLogEntries,
// To at most the settled head's size), each checked against the keybroker's tree, for a
// monitor that verifies every guest's history (tlog.Audit). It returns ErrInvalidRequest,
// ErrLogCorrupted, or ErrVaultUnavailable.
func (k *Keybroker) LogEntries(ctx context.Context, req *kbwire.LogEntriesRequest) (*kbwire.LogEntriesResponse, error) {
	if req.From > req.To || req.To-req.From > kbwire.MaxLogEntries {
		return nil, fmt.Errorf("leaves %d to %d: at most %d, in order: %w", req.From, req.To, kbwire.MaxLogEntries, ErrInvalidRequest)
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	idx := make([]uint64, 0, req.To-req.From)
	for i := req.From; i < req.To; i++ {
		idx = append(idx, i)
	}
	entries, err := k.rlog.read(ctx, req.To, idx, false)
	if err != nil {
		return nil, err
	}
	resp := &kbwire.LogEntriesResponse{Leaves: make([][]byte, len(entries))}
	for i, e := range entries {
		resp.Leaves[i] = e.Leaf
	}
	return resp, nil
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
