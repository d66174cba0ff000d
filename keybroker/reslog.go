package keybroker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
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
	logger    *slog.Logger
	origin    string
	witnesses []*tlog.WitnessVerifier
	// sign signs with the keybroker's key; pub returns its public half.
	sign func(ctx context.Context, msg []byte) ([]byte, error)
	pub  func(ctx context.Context) (ed25519.PublicKey, error)

	// qmu guards queue and leading: the appends waiting for the next batch, and whether a
	// goroutine is writing batches.
	qmu     sync.Mutex
	queue   []*appendReq
	leading bool
	// finishing is that goroutine.
	finishing sync.WaitGroup

	mu   sync.Mutex // guards tree and guests; held while they catch up with Vault
	tree tlog.Tree
	// guests are the indexes of each guest's entries in tree ("<tenant>/<vm>"), oldest first:
	// a guest's history is read from them, not from its log/guests record, which whoever
	// writes to the KV mount could roll back to hide the guest's newest entries.
	guests map[string][]uint64
}

// finishTimeout bounds the writing of one batch of appends.
const finishTimeout = 30 * time.Second

// maxAppendAttempts bounds how many indexes an append tries before giving up: each failure is
// another keybroker's append winning the index, so this is contention, not an error loop.
const maxAppendAttempts = 1000

// appendReq is one append waiting for its batch.
type appendReq struct {
	e *tlog.Entry
	// index and err are set before written is closed.
	index uint64
	err   error
	// written is closed once the entry is written (or failed), settled once the head is past
	// it (or finishing it failed: err says so).
	written, settled chan struct{}
}

// append adds e (Seq, Prev and Time are set here) and returns its index. A commit, abort or
// cleanup already the guest's newest entry is not appended again (an ending retried from the
// journal): its index is returned.
//
// Appends of one keybroker are written in batches, one batch at a time, by a goroutine that
// takes whatever is queued when the last batch ends (group commit): a batch of k costs about
// k+4 Vault round trips, where k appends racing each other would cost O(k²) in conflicts.
// The entry is in the log once it is written: from then on any append or checkpoint
// finishes it. With settle false, append returns then (the guest's record and the head
// follow in the same batch); with settle true, it returns once the head is past the entry,
// so that a checkpoint and a proof of it can follow at once. If ctx ends first, append
// returns ctx's error and the entry may still be appended.
func (l *residencyLog) append(ctx context.Context, e *tlog.Entry, settle bool) (uint64, error) {
	e.Type = tlog.EntryType
	r := &appendReq{e: e, written: make(chan struct{}), settled: make(chan struct{})}
	l.qmu.Lock()
	l.queue = append(l.queue, r)
	if !l.leading {
		l.leading = true
		l.finishing.Go(func() { l.lead(ctx) })
	}
	l.qmu.Unlock()
	wait := r.written
	if settle {
		wait = r.settled
	}
	select {
	case <-wait:
		return r.index, r.err
	case <-ctx.Done():
		return 0, fmt.Errorf("appending to the residency log: %w", ctx.Err())
	}
}

// lead writes queued appends, a batch at a time, until the queue is empty.
func (l *residencyLog) lead(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	for {
		l.qmu.Lock()
		batch := l.queue
		l.queue = nil
		if len(batch) == 0 {
			l.leading = false
			l.qmu.Unlock()
			return
		}
		l.qmu.Unlock()
		bctx, cancel := context.WithTimeout(ctx, finishTimeout)
		l.appendBatch(bctx, batch)
		cancel()
	}
}

// guestState is a guest's log/guests record as a batch reads and plans it.
type guestState struct {
	rec     logGuestRecord
	fromSeq uint64 // the record's seq when read
	planned bool   // rec is an entry of this batch, not yet written
}

// appendBatch appends batch in order and completes every request in it.
func (l *residencyLog) appendBatch(ctx context.Context, batch []*appendReq) {
	fail := func(rs []*appendReq, err error) {
		for _, r := range rs {
			r.err = err
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
		// The head first, then the guests' records: see the comment on the layout.
		var head logHeadRecord
		if _, err := l.recs.get(ctx, logHeadPath, &head); err != nil {
			fail(pending, fmt.Errorf("appending to the residency log: %w", err))
			return
		}
		guests, err := l.readGuests(ctx, pending)
		if err != nil {
			fail(pending, err)
			return
		}

		// Plan: seq and prev of each entry, in order, at indexes n, n+1, ….
		n := head.Size
		var plan []*appendReq
		var leaves, hashes [][]byte
		var next []*appendReq // left for the next round
		for _, r := range pending {
			st := guests[guestKey(r.e.Tenant, r.e.VM)]
			switch r.e.Kind {
			case tlog.KindCommit, tlog.KindAbort, tlog.KindCleanup:
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
		err = l.settleBatch(ctx, n, written, hashes[:wrote])
		for _, r := range written {
			r.err = err
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
		}
		pending = next
	}
}

func guestKey(tenant, vm string) string { return tenant + "/" + vm }

// readGuests reads the log/guests records of the guests of rs, in parallel.
func (l *residencyLog) readGuests(ctx context.Context, rs []*appendReq) (map[string]*guestState, error) {
	guests := map[string]*guestState{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, r := range rs {
		k := guestKey(r.e.Tenant, r.e.VM)
		if guests[k] != nil {
			continue
		}
		st := &guestState{}
		guests[k] = st
		g.Go(func() error {
			if _, err := l.recs.get(gctx, logGuestPath(r.e.Tenant, r.e.VM), &st.rec); err != nil {
				return fmt.Errorf("appending to the residency log: %w", err)
			}
			st.fromSeq = st.rec.Seq
			return nil
		})
	}
	return guests, g.Wait()
}

// settleBatch moves the records of the guests of written (entries n, n+1, … with hashes)
// past their entries, then the head past them all.
func (l *residencyLog) settleBatch(ctx context.Context, n uint64, written []*appendReq, hashes [][]byte) error {
	if len(written) == 0 {
		return nil
	}
	// Each guest's newest entry in the batch, and its seq before the batch.
	newest := map[string]logGuestRecord{}
	before := map[string]uint64{}
	for i, r := range written {
		k := guestKey(r.e.Tenant, r.e.VM)
		if _, ok := before[k]; !ok {
			before[k] = r.e.Seq - 1
		}
		newest[k] = logGuestRecord{Seq: r.e.Seq, Last: tlog.Link{Index: n + uint64(i), Hash: hashes[i]}, Kind: r.e.Kind, Migration: r.e.MigrationID}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for k, rec := range newest {
		g.Go(func() error {
			tenant, vm, _ := strings.Cut(k, "/")
			return l.advanceGuest(gctx, tenant, vm, before[k], rec)
		})
	}
	if err := g.Wait(); err != nil {
		return err
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

// advanceHead moves the head past entries n, n+1, … (with hashes), unless it is there
// already.
func (l *residencyLog) advanceHead(ctx context.Context, n uint64, hashes [][]byte) error {
	end := n + uint64(len(hashes))
	for {
		var head logHeadRecord
		ver, err := l.recs.get(ctx, logHeadPath, &head)
		if err != nil {
			return fmt.Errorf("appending to the residency log: %w", err)
		}
		if head.Size >= end {
			return nil
		}
		if head.Size < n {
			return fmt.Errorf("%w: entry %d exists while the head is %d", ErrLogCorrupted, n, head.Size)
		}
		r, err := rangeFactory.NewRange(0, head.Size, head.Range)
		if err != nil {
			return fmt.Errorf("%w: head: %w", ErrLogCorrupted, err)
		}
		for _, h := range hashes[head.Size-n:] {
			if err := r.Append(h, nil); err != nil {
				return fmt.Errorf("%w: head: %w", ErrLogCorrupted, err)
			}
		}
		if _, err := l.recs.put(ctx, logHeadPath, &logHeadRecord{Size: end, Range: r.Hashes()}, ver); err == nil {
			return nil
		} else if !errors.Is(err, errConflict) {
			return fmt.Errorf("appending to the residency log: %w", err)
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
	return l.advanceHead(ctx, n, [][]byte{hash})
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

// syncTree brings the in-memory tree up to the head (at least size leaves) and checks its
// root against the head's. The caller holds l.mu.
func (l *residencyLog) syncTree(ctx context.Context, size uint64) (*logHeadRecord, error) {
	head, err := l.settledHead(ctx)
	if err != nil {
		return nil, err
	}
	if head.Size < size {
		return nil, fmt.Errorf("reading the residency log: size %d asked, the log has %d: %w", size, head.Size, ErrInvalidRequest)
	}
	from := l.tree.Size()
	if from > head.Size {
		return nil, fmt.Errorf("%w: the head went back from %d to %d", ErrLogCorrupted, from, head.Size)
	}
	// Read the missing leaves, a batch at a time, in parallel.
	const batch = 64
	for lo := from; lo < head.Size; lo += batch {
		hi := min(lo+batch, head.Size)
		hashes := make([][]byte, hi-lo)
		owners := make([]string, hi-lo)
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
				hashes[i-lo], owners[i-lo] = tlog.LeafHash(rec.Leaf), e.Tenant+"/"+e.VM
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return nil, err
		}
		if l.guests == nil {
			l.guests = map[string][]uint64{}
		}
		for j, h := range hashes {
			l.guests[owners[j]] = append(l.guests[owners[j]], l.tree.Size())
			l.tree.Append(h)
		}
	}
	want, err := head.root()
	if err != nil {
		return nil, err
	}
	got, err := l.tree.Root(head.Size)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(got, want) {
		// Forget what was read: the next call reads it again, and fails again until the
		// operator restores what was altered.
		l.tree, l.guests = tlog.Tree{}, nil
		return nil, fmt.Errorf("%w: the entries do not hash to the head's root at size %d", ErrLogCorrupted, head.Size)
	}
	return head, nil
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
	head, err := l.settledHead(ctx)
	if err != nil {
		return nil, err
	}
	if head.Size < minSize {
		return nil, fmt.Errorf("checkpoint of %d entries asked, the log has %d: %w", minSize, head.Size, ErrInvalidRequest)
	}
	var rec logCheckpointRecord
	ver, err := l.recs.get(ctx, logCheckpointPath(head.Size), &rec)
	if err != nil {
		return nil, fmt.Errorf("reading the residency log's checkpoint: %w", err)
	}
	if ver == 0 {
		// Ed25519 is deterministic: keybrokers that sign the same size race to store the
		// same bytes.
		root, err := head.root()
		if err != nil {
			return nil, err
		}
		pub, err := l.pub(ctx)
		if err != nil {
			return nil, err
		}
		signed, err := tlog.Sign(tlog.Checkpoint{Origin: l.origin, Size: head.Size, Root: root}, pub, func(msg []byte) ([]byte, error) {
			return l.sign(ctx, msg)
		})
		if err != nil {
			return nil, err
		}
		if _, err := l.recs.put(ctx, logCheckpointPath(head.Size), &logCheckpointRecord{Note: signed}, 0); err != nil && !errors.Is(err, errConflict) {
			return nil, fmt.Errorf("storing the residency log's checkpoint: %w", err)
		}
		if err := l.raise(ctx, logLatestPath, head.Size); err != nil {
			return nil, err
		}
	}
	return l.storedCheckpoint(ctx, head.Size)
}

// covering returns a signed checkpoint of at least minSize entries: the newest one signed if
// it is large enough (under load, receipts share checkpoints instead of each signing one),
// else a new one.
func (l *residencyLog) covering(ctx context.Context, minSize uint64) (*tlog.Signed, error) {
	var p logPointerRecord
	ver, err := l.recs.get(ctx, logLatestPath, &p)
	if err != nil {
		return nil, fmt.Errorf("reading the residency log's checkpoint: %w", err)
	}
	if ver != 0 && p.Size >= minSize {
		return l.storedCheckpoint(ctx, p.Size)
	}
	return l.checkpoint(ctx, minSize, false)
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
	text, _, _ := bytes.Cut(cosigned, []byte("\n\n"))
	c, err := tlog.ParseCheckpoint(string(text) + "\n")
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
