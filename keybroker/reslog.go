package keybroker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
	"golang.org/x/sync/errgroup"

	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// The residency log (package tlog, docs/log.md) lives in the KV mount beside the keybroker's
// other records, so that it survives any keybroker and every keybroker on one Vault appends
// to one tree:
//
//	log/entries/<i>          leaf i, created check-and-set 0: whoever creates it owns index i
//	log/guests/<t>/<vm>      the guest's newest entry (seq, index, leaf hash, kind, migration)
//	log/head                 the tree's size and its compact range (the right border's hashes)
//	log/checkpoints/<size>   a signed checkpoint of that size, with witnesses' cosignatures
//	log/checkpoint           the size of the newest checkpoint; log/witnessed, of the newest
//	                         one a witness cosigned
//
// An append reads the head (size n) and then the guest's record, writes entry n with the
// guest's next seq, then advances the guest's record and then the head. Entry n's
// check-and-set 0 is the one point of serialization: two appends never share an index, and
// because the head passes n only after the guest's record took entry n, an append that read
// head n saw every earlier entry of its guest, so two entries never share a seq. An append
// that finds entry n taken first finishes it (guest record, head) for whoever wrote it, who
// may have died in between, and tries n+1; so the log never stalls on a dead keybroker.
//
// Each keybroker keeps the tree in memory (tlog.Tree), read from log/entries and checked
// against the head's compact range, to answer proofs, with the indexes of each guest's
// entries: a guest's history is read from those, while its log/guests record only tells the
// next append the guest's newest entry.
const (
	logEntriesDir    = "log/entries/"
	logHeadPath      = "log/head"
	logCheckpointDir = "log/checkpoints/"
	logLatestPath    = "log/checkpoint"
	logWitnessedPath = "log/witnessed"
)

func logGuestPath(tenant, vm string) string { return "log/guests/" + tenant + "/" + vm }
func logEntryPath(i uint64) string          { return logEntriesDir + strconv.FormatUint(i, 10) }
func logCheckpointPath(size uint64) string  { return logCheckpointDir + strconv.FormatUint(size, 10) }

// DefaultLogOrigin is the residency log's origin (its name in checkpoints) when
// Config.LogOrigin is empty.
const DefaultLogOrigin = "lethe-keybroker"

// ErrLogCorrupted: the log's storage does not match its head (an entry altered or removed in
// Vault behind the keybroker's back). The keybroker then refuses to append or prove.
var ErrLogCorrupted = errors.New("residency log storage corrupted")

type logEntryRecord struct {
	Leaf []byte `json:"leaf"`
}

type logGuestRecord struct {
	Seq       uint64    `json:"seq"`
	Last      tlog.Link `json:"last"`
	Kind      tlog.Kind `json:"kind"`
	Migration string    `json:"migration"`
}

type logHeadRecord struct {
	Size  uint64   `json:"size"`
	Range [][]byte `json:"range"`
}

type logCheckpointRecord struct {
	Note []byte `json:"note"`
}

type logPointerRecord struct {
	Size uint64 `json:"size"`
}

var rangeFactory = compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}

// root returns the root hash of the head's tree.
func (h *logHeadRecord) root() ([]byte, error) {
	r, err := rangeFactory.NewRange(0, h.Size, h.Range)
	if err != nil {
		return nil, fmt.Errorf("%w: head: %w", ErrLogCorrupted, err)
	}
	if h.Size == 0 {
		return rfc6962.DefaultHasher.EmptyRoot(), nil
	}
	root, err := r.GetRootHash(nil)
	if err != nil {
		return nil, fmt.Errorf("%w: head: %w", ErrLogCorrupted, err)
	}
	return root, nil
}

// residencyLog appends to the residency log and proves what it holds.
type residencyLog struct {
	recs      recordStore
	origin    string
	witnesses []*tlog.WitnessVerifier
	// sign signs with the keybroker's key; pub returns its public half.
	sign func(ctx context.Context, msg []byte) ([]byte, error)
	pub  func(ctx context.Context) (ed25519.PublicKey, error)

	// qmu guards queue, leading and idle: the appends waiting for the next batch, whether a
	// goroutine (the leader) is writing batches, and a channel closed when it stops.
	qmu     sync.Mutex
	queue   []*appendReq
	leading bool
	idle    chan struct{}
	// cache is the leader's view after its last settled batch; only the leader touches it
	// (leaders follow one another through qmu).
	cache appendCache

	// syncMu serializes catching tree and guests up with Vault (syncTree's reads of the
	// missing leaves, and forgetting them when they do not match the head), so that
	// concurrent callers read each leaf once. It is held across Vault reads; mu never is.
	syncMu sync.Mutex
	mu     sync.Mutex // guards tree and guests; held only while they are read or changed in memory
	tree   tlog.Tree
	// guests are the indexes of each guest's entries in tree ("<tenant>/<vm>"), oldest first:
	// a guest's history is read from them, not from its log/guests record, which whoever
	// writes to the KV mount could roll back to hide the guest's newest entries.
	guests map[string][]uint64
	// cp is the newest checkpoint covering signed (as stored and verified), guarded by mu;
	// cpMu serializes covering's signing, across Vault round trips.
	cp   *tlog.Signed
	cpMu sync.Mutex
}

// appendCache is what a leader knows once its batch settled with nobody else appending: the
// next index and the records of the guests it wrote. Any append by
// another keybroker since then must have created entry next first, so a batch that creates
// entry next proves the cache still true; one that finds it taken drops the cache and reads
// Vault again. With it, an append costs one create before it is written.
type appendCache struct {
	valid  bool
	next   uint64
	guests map[string]logGuestRecord
}

// maxCachedGuests bounds appendCache.guests.
const maxCachedGuests = 4096

// finishTimeout bounds the writing of one batch of appends.
const finishTimeout = 30 * time.Second

// maxAppendAttempts bounds how many indexes an append tries before giving up: each failure is
// another keybroker's append winning the index, so this is contention, not an error loop.
const maxAppendAttempts = 1000

// appendReq is one append waiting for its batch.
type appendReq struct {
	e *tlog.Entry
	// index and writeErr are set before written is closed; settleErr before settled is.
	index               uint64
	writeErr, settleErr error
	// written is closed once the entry is written (or failed), settled once the head is past
	// it (or finishing it failed).
	written, settled chan struct{}
	// notAfter is the deadline of the append's ctx (zero: none): a batch planned after it
	// does not write the entry.
	notAfter time.Time
}

// append adds e (Seq, Prev and Time are set here) and returns its index. A commit, abort,
// cleanup or forget already the guest's newest entry is not appended again (an ending retried
// from the journal): its index is returned, perhaps before the head is past it (settledHead finishes
// it).
//
// Appends of one keybroker are written in batches, one batch at a time, by a goroutine that
// takes whatever is queued when the last batch ends (group commit): a batch of k costs about
// k+4 Vault round trips, where k appends racing each other would cost O(k²) in conflicts.
// The entry is in the log once it is written: from then on any append or checkpoint
// finishes it. With settle false, append returns then (the guest's record and the head
// follow in the same batch); with settle true, it returns once the head is past the entry,
// so that a checkpoint and a proof of it can follow at once. If ctx ends first, append
// returns ctx's error and the entry may still be appended, but never by a batch planned after
// ctx's deadline: an append with a deadline d is written before d + finishTimeout, or not at
// all (a reissue counts on it, see reissueHold).
func (l *residencyLog) append(ctx context.Context, e *tlog.Entry, settle bool) (uint64, error) {
	e.Type = tlog.EntryType
	r := &appendReq{e: e, written: make(chan struct{}), settled: make(chan struct{})}
	r.notAfter, _ = ctx.Deadline()
	l.qmu.Lock()
	l.queue = append(l.queue, r)
	if !l.leading {
		l.leading, l.idle = true, make(chan struct{})
		go l.lead(context.WithoutCancel(ctx))
	}
	l.qmu.Unlock()
	wait := r.written
	if settle {
		wait = r.settled
	}
	select {
	case <-wait:
	case <-ctx.Done():
		return 0, fmt.Errorf("appending to the residency log: %w", ctx.Err())
	}
	if r.writeErr != nil {
		return 0, r.writeErr
	}
	if settle && r.settleErr != nil {
		return 0, r.settleErr
	}
	return r.index, nil
}

// lead writes queued appends, a batch at a time, until the queue is empty.
func (l *residencyLog) lead(ctx context.Context) {
	for {
		l.qmu.Lock()
		batch := l.queue
		l.queue = nil
		if len(batch) == 0 {
			l.leading = false
			close(l.idle)
			l.qmu.Unlock()
			return
		}
		l.qmu.Unlock()
		bctx, cancel := context.WithTimeout(ctx, finishTimeout)
		l.appendBatch(bctx, batch)
		cancel()
	}
}

// waitIdle waits until no batch is being written (appends queued after it returns start a
// new one).
func (l *residencyLog) waitIdle() {
	for {
		l.qmu.Lock()
		leading, idle := l.leading, l.idle
		l.qmu.Unlock()
		if !leading {
			return
		}
		<-idle
	}
}

// guestState is a guest's log/guests record as a batch reads and plans it.
type guestState struct {
	tenant, vm string
	rec        logGuestRecord
	planned    bool // rec is an entry of this batch, not yet written
}

// appendBatch appends batch in order and completes every request in it.
func (l *residencyLog) appendBatch(ctx context.Context, batch []*appendReq) {
	fail := func(rs []*appendReq, err error) {
		for _, r := range rs {
			r.writeErr, r.settleErr = err, err
			close(r.written)
			close(r.settled)
		}
	}
	pending := batch
	for attempt := 0; len(pending) > 0; attempt++ {
		if attempt == maxAppendAttempts {
			fail(pending, fmt.Errorf("appending to the residency log: %d indexes taken by others in a row: %w", maxAppendAttempts, ErrVaultUnavailable))
			return
		}
		// The head first, then the guests' records: see the comment on the layout. With a
		// valid cache the head is known, and the create of its next entry checks it.
		c := l.cache
		l.cache.valid = false
		n := c.next
		if !c.valid {
			var head logHeadRecord
			if _, err := l.recs.get(ctx, logHeadPath, &head); err != nil {
				fail(pending, fmt.Errorf("appending to the residency log: %w", err))
				return
			}
			n, c.guests = head.Size, nil
		}
		guests, err := l.readGuests(ctx, pending, c.guests)
		if err != nil {
			fail(pending, err)
			return
		}

		// Plan: seq and prev of each entry, in order, at indexes n, n+1, ….
		var plan []*appendReq
		var leaves, hashes [][]byte
		var next []*appendReq // left for the next round
		for _, r := range pending {
			if !r.notAfter.IsZero() && !time.Now().Before(r.notAfter) {
				fail([]*appendReq{r}, fmt.Errorf("appending to the residency log: not written by its deadline: %w", context.DeadlineExceeded))
				continue
			}
			st := guests[guestKey(r.e.Tenant, r.e.VM)]
			switch r.e.Kind {
			case tlog.KindCommit, tlog.KindAbort, tlog.KindCleanup, tlog.KindForget:
				if st.rec.Seq > 0 && st.rec.Kind == r.e.Kind && st.rec.Migration == r.e.MigrationID {
					if st.planned { // the same ending earlier in this batch: once it is written
						next = append(next, r)
						continue
					}
					r.index = st.rec.Last.Index
					close(r.written)
					close(r.settled)
					continue
				}
			}
			r.e.Seq, r.e.Prev = st.rec.Seq+1, nil
			if st.rec.Seq > 0 {
				last := st.rec.Last
				r.e.Prev = &last
			}
			leaf, err := r.e.Marshal()
			if err != nil {
				fail([]*appendReq{r}, err)
				continue
			}
			i := n + uint64(len(plan))
			hash := tlog.LeafHash(leaf)
			st.rec = logGuestRecord{Seq: r.e.Seq, Last: tlog.Link{Index: i, Hash: hash}, Kind: r.e.Kind, Migration: r.e.MigrationID}
			st.planned = true
			plan, leaves, hashes = append(plan, r), append(leaves, leaf), append(hashes, hash)
		}

		// Write, in order, until an index is taken.
		wrote := 0
		var taken bool
		for i, r := range plan {
			if _, err := l.recs.put(ctx, logEntryPath(n+uint64(i)), &logEntryRecord{Leaf: leaves[i]}, 0); err != nil {
				if errors.Is(err, errConflict) {
					taken = true
				} else {
					fail(plan[i:], fmt.Errorf("appending to the residency log: %w", err))
					plan = plan[:i]
				}
				break
			}
			r.index = n + uint64(i)
			close(r.written)
			wrote++
		}
		if taken {
			next = append(plan[wrote:], next...)
		}
		written := plan[:wrote]

		// Settle what was written: the guests' records, then the head.
		moved, err := l.settleBatch(ctx, n, written, hashes[:wrote])
		for _, r := range written {
			r.settleErr = err
			close(r.settled)
		}
		if err != nil {
			fail(next, err)
			return
		}
		if taken {
			if err := l.finishEntry(ctx, n+uint64(wrote)); err != nil {
				fail(next, err)
				return
			}
		} else if moved {
			l.cache = appendCache{valid: true, next: n + uint64(wrote), guests: c.guests}
			if l.cache.guests == nil || len(l.cache.guests) > maxCachedGuests {
				l.cache.guests = map[string]logGuestRecord{}
			}
			for k, st := range guests {
				l.cache.guests[k] = st.rec
			}
		}
		pending = next
	}
}

func guestKey(tenant, vm string) string { return tenant + "/" + vm }

// readGuests returns the log/guests records of the guests of rs: cached ones from cached, the
// others read from Vault, in parallel.
func (l *residencyLog) readGuests(ctx context.Context, rs []*appendReq, cached map[string]logGuestRecord) (map[string]*guestState, error) {
	guests := map[string]*guestState{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, r := range rs {
		k := guestKey(r.e.Tenant, r.e.VM)
		if guests[k] != nil {
			continue
		}
		st := &guestState{tenant: r.e.Tenant, vm: r.e.VM}
		guests[k] = st
		if rec, ok := cached[k]; ok {
			st.rec = rec
			continue
		}
		g.Go(func() error {
			if _, err := l.recs.get(gctx, logGuestPath(st.tenant, st.vm), &st.rec); err != nil {
				return fmt.Errorf("appending to the residency log: %w", err)
			}
			return nil
		})
	}
	return guests, g.Wait()
}

// settleBatch moves the records of the guests of written (entries n, n+1, … with hashes)
// past their entries, then the head past them all. It says whether it moved the head itself
// (not if another keybroker had moved it).
func (l *residencyLog) settleBatch(ctx context.Context, n uint64, written []*appendReq, hashes [][]byte) (bool, error) {
	if len(written) == 0 {
		return false, nil
	}
	// Each guest's newest entry in the batch, and its seq before the batch.
	type move struct {
		tenant, vm string
		from       uint64
		to         logGuestRecord
	}
	moves := map[string]*move{}
	for i, r := range written {
		k := guestKey(r.e.Tenant, r.e.VM)
		if moves[k] == nil {
			moves[k] = &move{tenant: r.e.Tenant, vm: r.e.VM, from: r.e.Seq - 1}
		}
		moves[k].to = logGuestRecord{Seq: r.e.Seq, Last: tlog.Link{Index: n + uint64(i), Hash: hashes[i]}, Kind: r.e.Kind, Migration: r.e.MigrationID}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, m := range moves {
		g.Go(func() error { return l.advanceGuest(gctx, m.tenant, m.vm, m.from, m.to) })
	}
	if err := g.Wait(); err != nil {
		return false, err
	}
	return l.advanceHead(ctx, n, hashes)
}

// advanceGuest moves a guest's record from seq from (or later) to rec, unless it is there
// already.
func (l *residencyLog) advanceGuest(ctx context.Context, tenant, vm string, from uint64, rec logGuestRecord) error {
	path := logGuestPath(tenant, vm)
	for {
		var g logGuestRecord
		ver, err := l.recs.get(ctx, path, &g)
		if err != nil {
			return fmt.Errorf("appending to the residency log: %w", err)
		}
		if g.Seq >= rec.Seq {
			return nil
		}
		if g.Seq < from {
			return fmt.Errorf("%w: %s/%s's newest entry went back from seq %d to %d", ErrLogCorrupted, tenant, vm, from, g.Seq)
		}
		if _, err := l.recs.put(ctx, path, &rec, ver); err == nil {
			return nil
		} else if !errors.Is(err, errConflict) {
			return fmt.Errorf("appending to the residency log: %w", err)
		}
	}
}

// advanceHead moves the head past entries n, n+1, … (with hashes), finishing first any
// entry between the head and n (a head rewound in Vault). It says whether it moved the head
// itself (not if the head was past them already).
func (l *residencyLog) advanceHead(ctx context.Context, n uint64, hashes [][]byte) (bool, error) {
	end := n + uint64(len(hashes))
	for {
		var head logHeadRecord
		ver, err := l.recs.get(ctx, logHeadPath, &head)
		if err != nil {
			return false, fmt.Errorf("appending to the residency log: %w", err)
		}
		if head.Size >= end {
			return false, nil
		}
		if head.Size < n {
			if err := l.finishEntry(ctx, head.Size); err != nil {
				return false, err
			}
			continue
		}
		r, err := rangeFactory.NewRange(0, head.Size, head.Range)
		if err != nil {
			return false, fmt.Errorf("%w: head: %w", ErrLogCorrupted, err)
		}
		for _, h := range hashes[head.Size-n:] {
			if err := r.Append(h, nil); err != nil {
				return false, fmt.Errorf("%w: head: %w", ErrLogCorrupted, err)
			}
		}
		if _, err := l.recs.put(ctx, logHeadPath, &logHeadRecord{Size: end, Range: r.Hashes()}, ver); err == nil {
			return true, nil
		} else if !errors.Is(err, errConflict) {
			return false, fmt.Errorf("appending to the residency log: %w", err)
		}
	}
}

// finishEntry finishes the append of entry n, written by someone else.
func (l *residencyLog) finishEntry(ctx context.Context, n uint64) error {
	var rec logEntryRecord
	ver, err := l.recs.get(ctx, logEntryPath(n), &rec)
	if err != nil {
		return fmt.Errorf("appending to the residency log: %w", err)
	}
	if ver == 0 {
		return fmt.Errorf("%w: entry %d vanished", ErrLogCorrupted, n)
	}
	e, err := tlog.ParseEntry(rec.Leaf)
	if err != nil {
		return fmt.Errorf("%w: entry %d: %w", ErrLogCorrupted, n, err)
	}
	return l.finish(ctx, n, e, rec.Leaf)
}

// finish moves the guest's record, then the head, past entry n (e, whose leaf is leaf). Each
// step is skipped if someone did it already.
func (l *residencyLog) finish(ctx context.Context, n uint64, e *tlog.Entry, leaf []byte) error {
	hash := tlog.LeafHash(leaf)
	rec := logGuestRecord{Seq: e.Seq, Last: tlog.Link{Index: n, Hash: hash}, Kind: e.Kind, Migration: e.MigrationID}
	if err := l.advanceGuest(ctx, e.Tenant, e.VM, e.Seq-1, rec); err != nil {
		return err
	}
	_, err := l.advanceHead(ctx, n, [][]byte{hash})
	return err
}

// settledHead finishes the entries written past the head (appends whose finishing is still
// on its way, or whose keybroker died) and returns the head that holds them all.
func (l *residencyLog) settledHead(ctx context.Context) (*logHeadRecord, error) {
	for {
		var head logHeadRecord
		if _, err := l.recs.get(ctx, logHeadPath, &head); err != nil {
			return nil, fmt.Errorf("reading the residency log: %w", err)
		}
		var rec logEntryRecord
		ver, err := l.recs.get(ctx, logEntryPath(head.Size), &rec)
		if err != nil {
			return nil, fmt.Errorf("reading the residency log: %w", err)
		}
		if ver == 0 {
			return &head, nil
		}
		if err := l.finishEntry(ctx, head.Size); err != nil {
			return nil, err
		}
	}
}

// guestIndexes returns the indexes of a guest's entries under the head, oldest first: the
// settled head if settle, else the head as it is, without finishing the entries written past
// it (settledHead).
func (l *residencyLog) guestIndexes(ctx context.Context, tenant, vm string, settle bool) ([]uint64, error) {
	if _, err := l.syncTo(ctx, 0, settle); err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.guests[guestKey(tenant, vm)]), nil
}

// guestPage is a page of a guest's entries with their proofs.
type guestPage struct {
	entries []tlog.ProvenEntry
	more    bool
}

// proveGuest returns up to limit of a guest's entries under size (from its from-th, from 0),
// with their inclusion proofs in the tree of size leaves.
func (l *residencyLog) proveGuest(ctx context.Context, tenant, vm string, size, from uint64, limit int) (*guestPage, error) {
	if _, err := l.syncTree(ctx, size); err != nil {
		return nil, err
	}
	l.mu.Lock()
	var all []uint64
	for _, i := range l.guests[guestKey(tenant, vm)] {
		if i < size {
			all = append(all, i)
		}
	}
	l.mu.Unlock()
	page := &guestPage{}
	if from >= uint64(len(all)) {
		return page, nil
	}
	idx := all[from:]
	if len(idx) > limit {
		idx, page.more = idx[:limit], true
	}
	var err error
	page.entries, err = l.prove(ctx, size, idx)
	return page, err
}

// prove returns the entries at idx with their inclusion proofs in the tree of size leaves:
// the proofs from the tree in memory (under mu; the tree is first caught up with Vault if it
// has fewer than size leaves), the leaves read from Vault after (in parallel, outside the
// lock), each checked against the tree's leaf hash.
func (l *residencyLog) prove(ctx context.Context, size uint64, idx []uint64) ([]tlog.ProvenEntry, error) {
	return l.read(ctx, size, idx, true)
}

// read is prove, with proofs only if withProofs.
func (l *residencyLog) read(ctx context.Context, size uint64, idx []uint64, withProofs bool) ([]tlog.ProvenEntry, error) {
	out, want, err := l.proofs(ctx, size, idx, withProofs)
	if err != nil {
		return nil, err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for j, i := range idx {
		g.Go(func() error {
			var rec logEntryRecord
			ver, err := l.recs.get(gctx, logEntryPath(i), &rec)
			if err != nil {
				return fmt.Errorf("reading the residency log: %w", err)
			}
			if ver == 0 || !bytes.Equal(tlog.LeafHash(rec.Leaf), want[j]) {
				return fmt.Errorf("%w: entry %d was removed or altered", ErrLogCorrupted, i)
			}
			out[j].Leaf = rec.Leaf
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return out, nil
}

// size returns how many leaves the in-memory tree holds.
func (l *residencyLog) size() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.tree.Size()
}

// proofs returns the indexes idx with their inclusion proofs in the tree of size leaves (if
// withProofs), and their leaf hashes, all from the tree in memory. A tree that holds size
// leaves already was checked against a head of at least that size: proofs in it need no
// Vault read (leaves altered since fail the caller's check against the hashes, and the next
// catch-up).
func (l *residencyLog) proofs(ctx context.Context, size uint64, idx []uint64, withProofs bool) ([]tlog.ProvenEntry, [][]byte, error) {
	if l.size() < size {
		if _, err := l.syncTo(ctx, size, false); err != nil {
			return nil, nil, err
		}
	}
	out := make([]tlog.ProvenEntry, len(idx))
	want := make([][]byte, len(idx))
	l.mu.Lock()
	defer l.mu.Unlock()
	for j, i := range idx {
		var err error
		if want[j], err = l.tree.LeafHash(i); err == nil {
			out[j].Index = i
			if withProofs {
				out[j].Proof, err = l.tree.InclusionProof(i, size)
			}
		}
		if err != nil {
			return nil, nil, err
		}
	}
	return out, want, nil
}

// proveLeaf returns entry i, whose leaf the caller read already, with its inclusion proof in
// the tree of size leaves, after checking the leaf against the tree's.
func (l *residencyLog) proveLeaf(ctx context.Context, size, i uint64, leaf []byte) (tlog.ProvenEntry, error) {
	out, want, err := l.proofs(ctx, size, []uint64{i}, true)
	if err != nil {
		return tlog.ProvenEntry{}, err
	}
	if !bytes.Equal(tlog.LeafHash(leaf), want[0]) {
		return tlog.ProvenEntry{}, fmt.Errorf("%w: entry %d was altered", ErrLogCorrupted, i)
	}
	out[0].Leaf = leaf
	return out[0], nil
}

// syncTree brings the in-memory tree up to the settled head (which must have at least size
// leaves), checks its root against the head's and returns the head. No Vault round trip
// happens under l.mu: the head is read first, and a caller whose head the tree covers
// already is done; the others wait for l.syncMu, whose holder reads a fresh head (so that
// one catch-up serves every caller that waited for it), then the missing leaves, and takes
// l.mu only to add them.
func (l *residencyLog) syncTree(ctx context.Context, size uint64) (*logHeadRecord, error) {
	return l.syncTo(ctx, size, true)
}

// syncTo is syncTree, with the head as it is unless settle (or it has fewer than size
// leaves): entries written past it are then left to their appenders and the next settled
// read. Under load the head is always a batch behind the entries written, and every reader
// finishing those entries at once multiplied the Vault round trips of the appends.
func (l *residencyLog) syncTo(ctx context.Context, size uint64, settle bool) (*logHeadRecord, error) {
	// The tree holds the leaves of a head read before this one: a smaller head went back.
	floor := l.size()
	head, want, err := l.readHead(ctx, size, floor, settle)
	if err != nil {
		return nil, err
	}
	if l.covers(head.Size, want) {
		return head, nil
	}

	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	if l.covers(head.Size, want) { // caught up while this call waited
		return head, nil
	}
	// Not settled: head is (if the caller asked), and settling under syncMu would hold up
	// every caller behind it.
	fresh, freshWant, err := l.readHead(ctx, size, head.Size, false)
	if err != nil {
		return nil, err
	}
	// Only syncMu's holder adds leaves or forgets them: from stays the tree's size until
	// they are added below.
	from := l.size()
	hashes, owners, err := l.readLeaves(ctx, from, fresh.Size)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.guests == nil {
		l.guests = map[string][]uint64{}
	}
	for j, h := range hashes {
		l.guests[owners[j]] = append(l.guests[owners[j]], l.tree.Size())
		l.tree.Append(h)
	}
	for _, h := range []struct {
		size uint64
		root []byte
	}{{head.Size, want}, {fresh.Size, freshWant}} {
		got, err := l.tree.Root(h.size)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(got, h.root) {
			// Forget what was read: the next call reads it again, and fails again until
			// the operator restores what was altered.
			l.tree, l.guests = tlog.Tree{}, nil
			return nil, fmt.Errorf("%w: the entries do not hash to the head's root at size %d", ErrLogCorrupted, h.size)
		}
	}
	return fresh, nil
}

// readHead returns the head (settled if settle, or if it has fewer than size leaves) and its
// root, after checking that it has at least size leaves (else ErrInvalidRequest) and did not
// go back below floor (else ErrLogCorrupted).
func (l *residencyLog) readHead(ctx context.Context, size, floor uint64, settle bool) (*logHeadRecord, []byte, error) {
	head := &logHeadRecord{}
	if !settle {
		if _, err := l.recs.get(ctx, logHeadPath, head); err != nil {
			return nil, nil, fmt.Errorf("reading the residency log: %w", err)
		}
		settle = head.Size < size
	}
	if settle {
		var err error
		if head, err = l.settledHead(ctx); err != nil {
			return nil, nil, err
		}
	}
	if head.Size < size {
		return nil, nil, fmt.Errorf("reading the residency log: size %d asked, the log has %d: %w", size, head.Size, ErrInvalidRequest)
	}
	if head.Size < floor {
		return nil, nil, fmt.Errorf("%w: the head went back from %d to %d", ErrLogCorrupted, floor, head.Size)
	}
	root, err := head.root()
	if err != nil {
		return nil, nil, err
	}
	return head, root, nil
}

// covers says whether the in-memory tree has size leaves whose root is want.
func (l *residencyLog) covers(size uint64, want []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.tree.Size() < size {
		return false
	}
	got, err := l.tree.Root(size)
	return err == nil && bytes.Equal(got, want)
}

// readLeaves reads leaves [from, to) from Vault, a batch at a time, in parallel, and returns
// their hashes and their guests ("<tenant>/<vm>").
func (l *residencyLog) readLeaves(ctx context.Context, from, to uint64) ([][]byte, []string, error) {
	if from >= to {
		return nil, nil, nil
	}
	hashes := make([][]byte, to-from)
	owners := make([]string, to-from)
	const batch = 64
	for lo := from; lo < to; lo += batch {
		hi := min(lo+batch, to)
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(16)
		for i := lo; i < hi; i++ {
			g.Go(func() error {
				var rec logEntryRecord
				ver, err := l.recs.get(gctx, logEntryPath(i), &rec)
				if err != nil {
					return fmt.Errorf("reading the residency log: %w", err)
				}
				if ver == 0 {
					return fmt.Errorf("%w: entry %d is missing", ErrLogCorrupted, i)
				}
				e, err := tlog.ParseEntry(rec.Leaf)
				if err != nil {
					return fmt.Errorf("%w: entry %d: %w", ErrLogCorrupted, i, err)
				}
				hashes[i-from], owners[i-from] = tlog.LeafHash(rec.Leaf), guestKey(e.Tenant, e.VM)
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return nil, nil, err
		}
	}
	return hashes, owners, nil
}

// checkpoint returns a signed checkpoint of the head (at least minSize entries): the stored one
// of that size, or a new one, signed and stored. With witnessed, it returns the newest
// checkpoint a witness cosigned instead (ErrInvalidRequest if there is none of at least
// minSize entries).
func (l *residencyLog) checkpoint(ctx context.Context, minSize uint64, witnessed bool) (*tlog.Signed, error) {
	if witnessed {
		var p logPointerRecord
		ver, err := l.recs.get(ctx, logWitnessedPath, &p)
		if err != nil {
			return nil, fmt.Errorf("reading the residency log's checkpoint: %w", err)
		}
		if ver == 0 || p.Size < minSize {
			return nil, fmt.Errorf("no witnessed checkpoint of at least %d entries yet: %w", minSize, ErrInvalidRequest)
		}
		return l.storedCheckpoint(ctx, p.Size)
	}
	// A checkpoint for entries the head is past already (a receipt's) signs the head as it
	// is; one of the log as it is (the API's, the periodic one) settles the entries written
	// past it first, finishing appends whose keybroker died.
	head, err := l.syncTo(ctx, minSize, minSize == 0)
	if err != nil {
		return nil, err
	}
	if stored, err := l.stored(ctx, head); stored != nil || err != nil {
		return stored, err
	}
	root, size, err := l.extension(ctx, head)
	if err != nil {
		return nil, err
	}
	// Ed25519 is deterministic: keybrokers that sign the same size race to store the same
	// bytes.
	pub, err := l.pub(ctx)
	if err != nil {
		return nil, err
	}
	signed, err := tlog.Sign(tlog.Checkpoint{Origin: l.origin, Size: size, Root: root}, pub, func(msg []byte) ([]byte, error) {
		return l.sign(ctx, msg)
	})
	if err != nil {
		return nil, err
	}
	if _, err := l.recs.put(ctx, logCheckpointPath(size), &logCheckpointRecord{Note: signed}, 0); err != nil && !errors.Is(err, errConflict) {
		return nil, fmt.Errorf("storing the residency log's checkpoint: %w", err)
	}
	if err := l.raise(ctx, logLatestPath, size); err != nil {
		return nil, err
	}
	return l.storedCheckpoint(ctx, size)
}

// stored returns the newest signed checkpoint if it is of the settled head's size (nothing
// to sign), or nil.
func (l *residencyLog) stored(ctx context.Context, head *logHeadRecord) (*tlog.Signed, error) {
	var p logPointerRecord
	if ver, err := l.recs.get(ctx, logLatestPath, &p); err != nil || ver == 0 || p.Size != head.Size {
		return nil, err
	}
	return l.storedCheckpoint(ctx, p.Size)
}

// extension returns the root and size of the log to sign next: the tree as this keybroker
// read and checked it against head (syncTree), which must extend the newest checkpoint it
// signed before.
// Whoever rewrites entries in Vault and recomputes the head cannot get that signed: a
// keybroker that read the entries before sees them change, and any keybroker sees that the
// tree no longer has the signed checkpoint's root at its size (ErrLogCorrupted).
func (l *residencyLog) extension(ctx context.Context, head *logHeadRecord) ([]byte, uint64, error) {
	var p logPointerRecord
	ver, err := l.recs.get(ctx, logLatestPath, &p)
	if err != nil {
		return nil, 0, fmt.Errorf("reading the residency log's checkpoint: %w", err)
	}
	var prev *tlog.Signed
	if ver != 0 {
		if p.Size > head.Size {
			return nil, 0, fmt.Errorf("%w: the log has %d entries, less than the checkpoint of %d it signed", ErrLogCorrupted, head.Size, p.Size)
		}
		if prev, err = l.storedCheckpoint(ctx, p.Size); err != nil {
			return nil, 0, err
		}
	}
	// The tree may have been forgotten and read again since syncTree checked it against
	// head: what is signed is a tree whose root at head.Size is still head's.
	want, err := head.root()
	if err != nil {
		return nil, 0, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if got, err := l.tree.Root(head.Size); err != nil || !bytes.Equal(got, want) {
		return nil, 0, fmt.Errorf("%w: the log changed while its checkpoint was being signed", ErrLogCorrupted)
	}
	if prev != nil {
		root, err := l.tree.Root(p.Size)
		if err != nil {
			return nil, 0, err
		}
		if !bytes.Equal(root, prev.Root) {
			return nil, 0, fmt.Errorf("%w: the log no longer extends the checkpoint of size %d it signed", ErrLogCorrupted, p.Size)
		}
	}
	root, err := l.tree.Root(head.Size)
	if err != nil {
		return nil, 0, err
	}
	return root, head.Size, nil
}

// covering returns a signed checkpoint of at least minSize entries: the newest one signed if
// it is large enough (under load, receipts share checkpoints instead of each signing one),
// else a new one. Callers that need a new one sign one at a time (cpMu): those that waited
// take the one signed meanwhile if it is large enough, which this keybroker keeps (cp).
func (l *residencyLog) covering(ctx context.Context, minSize uint64) (*tlog.Signed, error) {
	if cp := l.signedCovering(minSize); cp != nil {
		return cp, nil
	}
	var p logPointerRecord
	ver, err := l.recs.get(ctx, logLatestPath, &p)
	if err != nil {
		return nil, fmt.Errorf("reading the residency log's checkpoint: %w", err)
	}
	if ver != 0 && p.Size >= minSize {
		return l.storedCheckpoint(ctx, p.Size)
	}
	l.cpMu.Lock()
	defer l.cpMu.Unlock()
	if cp := l.signedCovering(minSize); cp != nil {
		return cp, nil
	}
	cp, err := l.checkpoint(ctx, minSize, false)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.cp == nil || cp.Size > l.cp.Size {
		l.cp = cp
	}
	l.mu.Unlock()
	return cp, nil
}

// signedCovering returns the newest checkpoint covering signed if it has at least minSize
// entries, or nil.
func (l *residencyLog) signedCovering(minSize uint64) *tlog.Signed {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cp != nil && l.cp.Size >= minSize {
		return l.cp
	}
	return nil
}

// raise moves the pointer at path up to size (never down).
func (l *residencyLog) raise(ctx context.Context, path string, size uint64) error {
	for {
		var p logPointerRecord
		ver, err := l.recs.get(ctx, path, &p)
		if err != nil {
			return fmt.Errorf("storing the residency log's checkpoint: %w", err)
		}
		if ver != 0 && p.Size >= size {
			return nil
		}
		if _, err := l.recs.put(ctx, path, &logPointerRecord{Size: size}, ver); err == nil {
			return nil
		} else if !errors.Is(err, errConflict) {
			return fmt.Errorf("storing the residency log's checkpoint: %w", err)
		}
	}
}

// storedCheckpoint returns the stored checkpoint of that size, verified with the keybroker's
// own key (a checkpoint altered in Vault is not served).
func (l *residencyLog) storedCheckpoint(ctx context.Context, size uint64) (*tlog.Signed, error) {
	var rec logCheckpointRecord
	ver, err := l.recs.get(ctx, logCheckpointPath(size), &rec)
	if err != nil {
		return nil, fmt.Errorf("reading the residency log's checkpoint: %w", err)
	}
	if ver == 0 {
		return nil, fmt.Errorf("%w: no checkpoint of size %d", ErrLogCorrupted, size)
	}
	v, err := l.verifier(ctx)
	if err != nil {
		return nil, err
	}
	s, err := tlog.Open(rec.Note, v, l.witnesses, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: checkpoint of size %d: %w", ErrLogCorrupted, size, err)
	}
	// A genuine checkpoint of another size, stored here, would prove a shorter log.
	if s.Size != size {
		return nil, fmt.Errorf("%w: the checkpoint stored for size %d is of size %d", ErrLogCorrupted, size, s.Size)
	}
	return s, nil
}

func (l *residencyLog) verifier(ctx context.Context) (note.Verifier, error) {
	pub, err := l.pub(ctx)
	if err != nil {
		return nil, err
	}
	return tlog.LogVerifier(l.origin, pub)
}

// cosign adds a witness's cosignatures of a stored checkpoint. It returns ErrInvalidRequest
// for a checkpoint the log never signed or cosignatures no configured witness made.
func (l *residencyLog) cosign(ctx context.Context, cosigned []byte) (*tlog.Signed, error) {
	if len(l.witnesses) == 0 {
		return nil, fmt.Errorf("this keybroker has no witnesses configured: %w", ErrInvalidRequest)
	}
	c, err := tlog.ParseUnverified(cosigned)
	if err != nil {
		return nil, fmt.Errorf("cosigning: %w: %w", ErrInvalidRequest, err)
	}
	for range maxAppendAttempts {
		var rec logCheckpointRecord
		ver, err := l.recs.get(ctx, logCheckpointPath(c.Size), &rec)
		if err != nil {
			return nil, fmt.Errorf("reading the residency log's checkpoint: %w", err)
		}
		if ver == 0 {
			return nil, fmt.Errorf("cosigning: the log signed no checkpoint of size %d: %w", c.Size, ErrInvalidRequest)
		}
		merged, err := tlog.AddCosignatures(rec.Note, cosigned, l.witnesses)
		if err != nil {
			return nil, fmt.Errorf("cosigning: %w: %w", ErrInvalidRequest, err)
		}
		if bytes.Equal(merged, rec.Note) {
			return nil, fmt.Errorf("cosigning: no new cosignature by a configured witness: %w", ErrInvalidRequest)
		}
		if _, err := l.recs.put(ctx, logCheckpointPath(c.Size), &logCheckpointRecord{Note: merged}, ver); err != nil {
			if errors.Is(err, errConflict) {
				continue
			}
			return nil, fmt.Errorf("storing a cosigned checkpoint: %w", err)
		}
		break
	}
	if err := l.raise(ctx, logWitnessedPath, c.Size); err != nil {
		return nil, err
	}
	return l.storedCheckpoint(ctx, c.Size)
}
