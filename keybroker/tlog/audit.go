package tlog

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
)

// GuestAudit is what Audit found for one guest.
type GuestAudit struct {
	Tenant, VM string
	// Entries is how many entries of the guest the log holds; NewestSeq and NewestIndex are
	// its newest's seq and index. A tenant whose history of the guest ends earlier (under the
	// same checkpoint, or one larger) was shown less than the log holds.
	Entries     int
	NewestSeq   uint64
	NewestIndex uint64
	// Report is VerifyHistory's over all of the guest's entries; Err its error, if any.
	Report *HistoryReport
	Err    error
}

// AuditReport is what Audit found: every guest of the log, sorted by tenant and VM.
type AuditReport struct {
	Checkpoint Checkpoint
	Guests     []GuestAudit
}

// Audit is a monitor's check of the whole log of an opened checkpoint: leaves must be all of
// its leaves, in order, hashing to its root; then every guest's entries, taken from the log
// itself (so none can be withheld), must form a complete history (VerifyHistory). It returns
// the report and, when the leaves are not the checkpoint's log, ErrInconsistent, or when a
// guest's history is not complete, ErrIncomplete joined with each guest's error (the report
// says which).
func Audit(cp *Signed, leaves [][]byte) (*AuditReport, error) {
	if uint64(len(leaves)) != cp.Size {
		return nil, fmt.Errorf("%w: %d leaves for a checkpoint of size %d", ErrInconsistent, len(leaves), cp.Size)
	}
	var tree Tree
	byGuest := map[[2]string][]uint64{}
	for i, leaf := range leaves {
		tree.Append(LeafHash(leaf))
		e, err := ParseEntry(leaf)
		if err != nil {
			return nil, fmt.Errorf("leaf %d: %w", i, err)
		}
		k := [2]string{e.Tenant, e.VM}
		byGuest[k] = append(byGuest[k], uint64(i))
	}
	root, err := tree.Root(cp.Size)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(root, cp.Root) {
		return nil, fmt.Errorf("%w: the leaves do not hash to the checkpoint's root", ErrInconsistent)
	}
	rep := &AuditReport{Checkpoint: cp.Checkpoint}
	var errs []error
	for k, idx := range byGuest {
		h := &History{Tenant: k[0], VM: k[1], Checkpoint: cp.Note}
		for _, i := range idx {
			p, err := tree.InclusionProof(i, cp.Size)
			if err != nil {
				return nil, err
			}
			h.Entries = append(h.Entries, ProvenEntry{Index: i, Leaf: leaves[i], Proof: p})
		}
		g := GuestAudit{Tenant: k[0], VM: k[1], Entries: len(idx), NewestIndex: idx[len(idx)-1]}
		g.Report, g.Err = VerifyHistory(cp, h)
		if g.Report != nil && len(g.Report.Entries) > 0 {
			n := len(g.Report.Entries)
			g.NewestSeq = g.Report.Entries[n-1].Seq
		}
		if g.Err != nil {
			errs = append(errs, fmt.Errorf("%s/%s: %w", k[0], k[1], g.Err))
		}
		rep.Guests = append(rep.Guests, g)
	}
	sort.Slice(rep.Guests, func(i, j int) bool {
		a, b := rep.Guests[i], rep.Guests[j]
		return a.Tenant < b.Tenant || a.Tenant == b.Tenant && a.VM < b.VM
	})
	if len(errs) > 0 {
		sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
		return rep, fmt.Errorf("%w: %w", ErrIncomplete, errors.Join(errs...))
	}
	return rep, nil
}
