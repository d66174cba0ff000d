package tlog

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// ProvenEntry is a leaf of the log with its index and its inclusion proof against a
// checkpoint's size.
type ProvenEntry struct {
	Index uint64   `json:"index"`
	Leaf  []byte   `json:"leaf"`
	Proof [][]byte `json:"proof"`
}

// History is a guest's entries, oldest first, each proven against one signed checkpoint.
type History struct {
	Tenant     string        `json:"tenant"`
	VM         string        `json:"vm"`
	Checkpoint []byte        `json:"checkpoint"`
	Entries    []ProvenEntry `json:"entries"`
	// Next, if not 0, says the answer holds only part of the chain: the next part starts at
	// that seq (a server pages long histories). VerifyHistory refuses a part.
	Next uint64 `json:"next,omitempty"`
}

// Residency is one epoch of a guest: where its key was sealed and whether it has ended.
type Residency struct {
	Epoch uint64
	// Hosts are the hosts the epoch's MDK was sealed to: the adoption's or the committed
	// migration's destination, then any reissue's.
	Hosts []string
	// Began is the migration (or adoption) that began it.
	Began string
	// Ended is the migration whose commit ended it, or the forget that destroyed its key (""
	// while it is the live epoch); its keys were destroyed by that commit or forget
	// (VerifyHistory checks it).
	Ended string
}

// HistoryReport is what VerifyHistory established.
type HistoryReport struct {
	Checkpoint Checkpoint
	Entries    []*Entry
	// Live is the guest's live epoch after the newest entry (0: not adopted, or forgotten).
	Live uint64
	// Residencies are the guest's epochs, oldest first; a guest forgotten and adopted again
	// has an epoch 1 for each adoption.
	Residencies []Residency
	// InProgress are migrations released and not ended yet.
	InProgress []string
	Denials    int
}

// ErrIncomplete is returned (wrapped, with errors.Join of every problem found) by
// VerifyHistory when a guest's entries do not form a complete, consistent history.
var ErrIncomplete = errors.New("history not complete")

// VerifyHistory checks a guest's history against a checkpoint already opened (Open): every
// entry is in the log at its index (inclusion proof), names the guest, and the entries are
// the guest's chain from Seq 1 (each naming the previous one by index and leaf hash), whose
// decisions follow one another: one adoption into epoch 1, each release from the live epoch to
// the next, each commit of a released migration destroying the migration key and the epoch it
// leaves, each abort destroying the migration key and the epoch it abandons, each forget
// destroying the live epoch's key while no migration is released (the guest may then be
// adopted again). A commit or abort repeated with the same statement (a retried ending)
// counts once.
//
// It returns ErrIncomplete (joined with each problem) or, for undecodable entries,
// ErrMalformed.
func VerifyHistory(cp *Signed, h *History) (*HistoryReport, error) {
	rep := &HistoryReport{Checkpoint: cp.Checkpoint}
	var problems []error
	fail := func(format string, args ...any) { problems = append(problems, fmt.Errorf(format, args...)) }

	if h.Next != 0 {
		fail("the answer holds the chain only up to seq %d: fetch the rest", h.Next-1)
	}
	var prev *Link
	released := map[string]*Entry{}
	ended := map[string]*Entry{}
	var adoption string
	// life is the index in rep.Residencies of the current adoption's first epoch: a guest
	// forgotten and adopted again starts a new life, whose epochs begin again at 1.
	life := 0
	// residency returns the current life's residency of epoch e, adding it if it has none.
	residency := func(e uint64) *Residency {
		for i := len(rep.Residencies) - 1; i >= life; i-- {
			if rep.Residencies[i].Epoch == e {
				return &rep.Residencies[i]
			}
		}
		rep.Residencies = append(rep.Residencies, Residency{Epoch: e})
		return &rep.Residencies[len(rep.Residencies)-1]
	}
	for i, pe := range h.Entries {
		e, err := ParseEntry(pe.Leaf)
		if err != nil {
			return nil, fmt.Errorf("entry %d: %w", pe.Index, err)
		}
		hash := LeafHash(pe.Leaf)
		if err := VerifyInclusion(pe.Index, cp.Size, hash, pe.Proof, cp.Root); err != nil {
			fail("entry %d (seq %d): not in the log of checkpoint %d: %w", pe.Index, e.Seq, cp.Size, err)
		}
		if e.Tenant != h.Tenant || e.VM != h.VM {
			fail("entry %d: names guest %s/%s, not %s/%s", pe.Index, e.Tenant, e.VM, h.Tenant, h.VM)
		}
		if e.Seq != uint64(i)+1 {
			fail("entry %d: seq %d where %d was due: an entry of the guest is missing or out of order", pe.Index, e.Seq, i+1)
		}
		switch {
		case prev == nil && e.Prev != nil:
			fail("entry %d: names a previous entry %d, but none came before", pe.Index, e.Prev.Index)
		case prev != nil && (e.Prev == nil || e.Prev.Index != prev.Index || !bytes.Equal(e.Prev.Hash, prev.Hash)):
			fail("entry %d: does not name the guest's previous entry %d: the chain is broken", pe.Index, prev.Index)
		case prev != nil && pe.Index <= prev.Index:
			fail("entry %d: comes after the guest's entry %d in its chain but not in the log", pe.Index, prev.Index)
		}
		prev = &Link{Index: pe.Index, Hash: hash}
		rep.Entries = append(rep.Entries, e)

		at := fmt.Sprintf("entry %d (%s of %s)", pe.Index, e.Kind, e.MigrationID)
		switch e.Kind {
		case KindDeny:
			rep.Denials++
		case KindAdopt:
			if rep.Live != 0 || e.FromEpoch != 0 || e.ToEpoch != 1 {
				fail("%s: adoption into epoch %d while epoch %d is live", at, e.ToEpoch, rep.Live)
				continue
			}
			rep.Live, adoption, life = 1, e.MigrationID, len(rep.Residencies)
			r := residency(1)
			r.Began, r.Hosts, r.Ended = e.MigrationID, []string{e.Host}, ""
		case KindReissue:
			if e.FromEpoch != rep.Live || e.ToEpoch != rep.Live || rep.Live == 0 {
				fail("%s: reissue of epoch %d while epoch %d is live", at, e.ToEpoch, rep.Live)
				continue
			}
			r := residency(rep.Live)
			r.Hosts = append(r.Hosts, e.Host)
		case KindRelease:
			if ended[e.MigrationID] != nil {
				fail("%s: released after it ended", at)
				continue
			}
			if e.FromEpoch != rep.Live || e.ToEpoch != rep.Live+1 || rep.Live == 0 {
				fail("%s: release from epoch %d to %d while epoch %d is live", at, e.FromEpoch, e.ToEpoch, rep.Live)
				continue
			}
			for id := range released {
				if id != e.MigrationID {
					fail("%s: released while migration %s is in progress", at, id)
				}
			}
			released[e.MigrationID] = e
		case KindCommit, KindAbort:
			if old := ended[e.MigrationID]; old != nil {
				if old.Kind != e.Kind || !bytes.Equal(old.Statement, e.Statement) {
					fail("%s: ended again, differently", at)
				}
				continue
			}
			ended[e.MigrationID] = e
			r := released[e.MigrationID]
			delete(released, e.MigrationID)
			if e.Kind == KindAbort {
				if r != nil && !destroys(e, MigrationKey(e.MigrationID), EpochKey(e.Tenant, e.VM, r.ToEpoch)) {
					fail("%s: does not destroy the migration key and epoch %d", at, r.ToEpoch)
				}
				if e.FromEpoch != rep.Live {
					fail("%s: abort leaves epoch %d live, but epoch %d is", at, e.FromEpoch, rep.Live)
				}
				continue
			}
			if r == nil {
				fail("%s: commit of a migration never released", at)
				continue
			}
			if e.FromEpoch != rep.Live || e.ToEpoch != r.ToEpoch {
				fail("%s: commit from epoch %d to %d while epoch %d is live", at, e.FromEpoch, e.ToEpoch, rep.Live)
				continue
			}
			if !destroys(e, MigrationKey(e.MigrationID), EpochKey(e.Tenant, e.VM, e.FromEpoch)) {
				fail("%s: does not destroy the migration key and epoch %d", at, e.FromEpoch)
			}
			residency(rep.Live).Ended = e.MigrationID
			rep.Live = e.ToEpoch
			next := residency(rep.Live)
			next.Began, next.Hosts = e.MigrationID, []string{r.Host}
		case KindCleanup:
			switch {
			case e.MigrationID == adoption && rep.Live == 1 && len(rep.Residencies) == life+1:
				if !destroys(e, EpochKey(e.Tenant, e.VM, 1)) {
					fail("%s: does not destroy epoch 1", at)
				}
				rep.Live, adoption, rep.Residencies = 0, "", rep.Residencies[:life]
			case released[e.MigrationID] != nil:
				r := released[e.MigrationID]
				if !destroys(e, MigrationKey(e.MigrationID), EpochKey(e.Tenant, e.VM, r.ToEpoch)) {
					fail("%s: does not destroy the migration key and epoch %d", at, r.ToEpoch)
				}
				delete(released, e.MigrationID)
			}
		case KindForget:
			if rep.Live == 0 || e.FromEpoch != rep.Live || e.ToEpoch != 0 {
				fail("%s: forget of epoch %d to %d while epoch %d is live", at, e.FromEpoch, e.ToEpoch, rep.Live)
				continue
			}
			if len(released) > 0 {
				fail("%s: forgotten while migration %s is released and not ended", at, strings.Join(slices.Sorted(maps.Keys(released)), ", "))
				continue
			}
			if !destroys(e, EpochKey(e.Tenant, e.VM, rep.Live)) {
				fail("%s: does not destroy epoch %d", at, rep.Live)
				continue
			}
			residency(rep.Live).Ended = e.MigrationID
			rep.Live, adoption, life = 0, "", len(rep.Residencies)
		}
	}
	for id := range released {
		rep.InProgress = append(rep.InProgress, id)
	}
	slices.Sort(rep.InProgress)
	if len(problems) > 0 {
		return rep, fmt.Errorf("%w: %w", ErrIncomplete, errors.Join(problems...))
	}
	return rep, nil
}

func destroys(e *Entry, keys ...string) bool {
	for _, k := range keys {
		if !slices.Contains(e.DestroyedKeys, k) {
			return false
		}
	}
	return true
}

// CheckExtends checks that next extends prev (both opened) by the consistency proof: a
// checkpoint never shrinks, one of the same size has the same root, and a larger one's tree
// has prev's as a prefix. A witness cosigns next only if it does; a tenant holding a pinned
// checkpoint moves its pin only if it does. It returns ErrInconsistent, wrapped.
func CheckExtends(prev, next Checkpoint, proof [][]byte) error {
	switch {
	case prev.Origin != next.Origin:
		return fmt.Errorf("%w: log %q is not %q", ErrInconsistent, next.Origin, prev.Origin)
	case next.Size < prev.Size:
		return fmt.Errorf("%w: checkpoint of size %d after one of size %d", ErrInconsistent, next.Size, prev.Size)
	case next.Size == prev.Size:
		if !bytes.Equal(next.Root, prev.Root) {
			return fmt.Errorf("%w: two roots for size %d", ErrInconsistent, next.Size)
		}
		return nil
	case prev.Size == 0:
		return nil
	}
	if err := VerifyConsistency(prev.Size, next.Size, proof, prev.Root, next.Root); err != nil {
		return fmt.Errorf("%w: %w", ErrInconsistent, err)
	}
	return nil
}

// ErrInconsistent: a checkpoint does not extend an earlier one of the same log: the log was
// rewritten, or different parties are shown different logs.
var ErrInconsistent = errors.New("checkpoint inconsistent with an earlier one")

// Inclusion is one entry of the log with its inclusion proof against a signed checkpoint: what
// travels with a receipt.
type Inclusion struct {
	Checkpoint []byte      `json:"checkpoint"`
	Entry      ProvenEntry `json:"entry"`
}

// VerifyReceipt checks that a receipt's ending is in the log: inc's entry is included in the
// checkpoint cp (opened from inc.Checkpoint), is a commit or abort of migrationID, and names
// the receipt whose signed payload is payload. It returns the entry, or an error wrapping
// ErrIncomplete or ErrMalformed.
func VerifyReceipt(cp *Signed, inc *Inclusion, migrationID string, payload []byte) (*Entry, error) {
	e, err := ParseEntry(inc.Entry.Leaf)
	if err != nil {
		return nil, err
	}
	if err := VerifyInclusion(inc.Entry.Index, cp.Size, LeafHash(inc.Entry.Leaf), inc.Entry.Proof, cp.Root); err != nil {
		return nil, fmt.Errorf("%w: the receipt's entry is not in the log: %w", ErrIncomplete, err)
	}
	switch {
	case e.Kind != KindCommit && e.Kind != KindAbort:
		return nil, fmt.Errorf("%w: the entry is a %s, not an ending", ErrIncomplete, e.Kind)
	case e.MigrationID != migrationID:
		return nil, fmt.Errorf("%w: the entry is of migration %s, not %s", ErrIncomplete, e.MigrationID, migrationID)
	case !bytes.Equal(e.Statement, StatementDigest(payload)):
		return nil, fmt.Errorf("%w: the entry names another receipt", ErrIncomplete)
	}
	return e, nil
}
