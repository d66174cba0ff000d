package keybroker

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/keybroker/receipt"
)

// The kinds of journal entries.
const (
	// kindDestroy: a migration's ending (commit or abort) whose keys must be destroyed and
	// whose receipt must be signed.
	kindDestroy = "destroy"
	// kindCleanup: a failed release whose keys (if any were created) must be destroyed and
	// whose reservation must be cleared. No receipt.
	kindCleanup = "cleanup"
	// kindForget: a forgotten guest whose live epoch's key must be destroyed, whose forget
	// must be logged and whose record must be released. No receipt.
	kindForget = "forget"
)

// journalEntry is a destruction that must complete. It is written before the first attempt
// and removed only after the last key is gone (and, for kindDestroy, the receipt stored).
type journalEntry struct {
	Kind        string `json:"kind"`
	MigrationID string `json:"migrationId"`
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	// Ending is kindDestroy's commit or abort.
	Ending  kbwire.Ending            `json:"ending,omitempty"`
	Erasure *receipt.ErasureEvidence `json:"erasure,omitempty"`
	// CommitAckDigest is the SHA-256 of kindDestroy's commit acknowledgement, if any.
	CommitAckDigest []byte `json:"commitAckDigest,omitempty"`
	// Proven says a commit's acknowledgement verified under the migration's transfer key and
	// its erasure evidence (if any) came from the released source, before the entry was
	// written: only a proven entry moves a released migration to committed.
	Proven bool `json:"proven,omitempty"`
	// Keys and Epoch are kindCleanup's keys and the epoch it must not leave behind; Epoch is
	// also kindForget's live epoch, whose key it destroys.
	Keys        []string  `json:"keys,omitempty"`
	Epoch       uint64    `json:"epoch,omitempty"`
	RequestedAt time.Time `json:"requestedAt"`
	// Statement is the SHA-256 of kindForget's signed statement, which its log entry names;
	// Signer ("admin" or "tenant") and Reason are who signed it and why, for its audit event.
	Statement []byte `json:"statement,omitempty"`
	Signer    string `json:"signer,omitempty"`
	Reason    string `json:"reason,omitempty"`
	// Destroyed are the keys deleted so far, with their last versions.
	Destroyed []receipt.DestroyedKey `json:"destroyed,omitempty"`
	Attempts  int                    `json:"attempts"`

	mu   sync.Mutex    // serializes attempts, and so the entry's writes after the first
	done chan struct{} // closed when the entry completes or is dropped
	err  error         // why it was dropped, if it was
	// written is closed once the entry's first write ended, with writeErr if it failed (the
	// entry then left the journal): until then nobody but its adder sees it.
	written  chan struct{}
	writeErr error
}

func (e *journalEntry) name() string { return e.Kind + "-" + e.MigrationID }

// journal holds pending destructions, in memory and, with a directory, one JSON file each
// (written to a temporary file, synced and renamed, and the directory synced, so that a crash
// leaves the old or the new entry, never a torn one).
//
// Files are written outside the journal's lock, which guards only the map of entries, so
// that the destructions of different migrations write and sync their files at once; the
// syncs of the directory that make their renames durable are shared (dirSync). An entry's
// writes are serialized by its own lock.
type journal struct {
	dir     string
	dirSync dirSync

	mu      sync.Mutex
	entries map[string]*journalEntry
}

// closed is a closed channel: the written of an entry read from disk.
var closed = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

func openJournal(dir string) (*journal, error) {
	j := &journal{dir: dir, entries: map[string]*journalEntry{}}
	j.dirSync.dir = filepath.Join(dir, "destructions")
	if dir == "" {
		return j, nil
	}
	jdir := filepath.Join(dir, "destructions")
	if err := os.MkdirAll(jdir, 0o700); err != nil {
		return nil, fmt.Errorf("opening destruction journal: %w", err)
	}
	files, err := os.ReadDir(jdir)
	if err != nil {
		return nil, fmt.Errorf("opening destruction journal: %w", err)
	}
	for _, f := range files {
		if !strings.HasSuffix(f.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(jdir, f.Name()))
		if err != nil {
			return nil, fmt.Errorf("opening destruction journal: %w", err)
		}
		e := &journalEntry{}
		if err := json.Unmarshal(b, e); err != nil {
			return nil, fmt.Errorf("opening destruction journal: %s: %w", f.Name(), err)
		}
		e.done, e.written = make(chan struct{}), closed
		j.entries[e.name()] = e
	}
	return j, nil
}

// add records e, or returns the entry already pending under its name. It returns once the
// entry is on disk (the one already pending too). It refuses an ending of a migration whose
// other ending is pending (ErrBothEpochs).
func (j *journal) add(e *journalEntry) error {
	j.mu.Lock()
	if old, ok := j.entries[e.name()]; ok {
		j.mu.Unlock()
		if old.Ending != e.Ending {
			return fmt.Errorf("migration %s has a pending %s: %w", e.MigrationID, old.Ending, ErrBothEpochs)
		}
		<-old.written
		return old.writeErr
	}
	e.done, e.written = make(chan struct{}), make(chan struct{})
	j.entries[e.name()] = e
	j.mu.Unlock()
	err := j.write(e)
	if err != nil {
		j.mu.Lock()
		delete(j.entries, e.name())
		j.mu.Unlock()
		e.writeErr = err
	}
	close(e.written)
	return err
}

// get returns the pending entry of that kind and migration, once it is on disk, or nil.
func (j *journal) get(kind, migrationID string) *journalEntry {
	j.mu.Lock()
	e := j.entries[kind+"-"+migrationID]
	j.mu.Unlock()
	if e == nil {
		return nil
	}
	<-e.written
	if e.writeErr != nil {
		return nil
	}
	return e
}

// pending returns the pending entries on disk, oldest first (not those still being added).
func (j *journal) pending() []*journalEntry {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]*journalEntry, 0, len(j.entries))
	for _, e := range j.entries {
		select {
		case <-e.written:
			out = append(out, e)
		default:
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].RequestedAt.Before(out[b].RequestedAt) })
	return out
}

// save persists e's progress. The caller holds e.mu.
func (j *journal) save(e *journalEntry) error {
	return j.write(e)
}

// finish removes e (completed, or dropped with err) and wakes its waiters. The caller holds
// e.mu.
func (j *journal) finish(e *journalEntry, err error) error {
	j.mu.Lock()
	pending := j.entries[e.name()] == e
	j.mu.Unlock()
	if !pending {
		return nil
	}
	if j.dir != "" {
		if rerr := os.Remove(j.path(e)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("removing journal entry %s: %w", e.name(), rerr)
		}
	}
	j.mu.Lock()
	if j.entries[e.name()] == e {
		delete(j.entries, e.name())
	}
	j.mu.Unlock()
	e.err = err
	close(e.done)
	return nil
}

func (j *journal) path(e *journalEntry) string {
	return filepath.Join(j.dir, "destructions", e.name()+".json")
}

// write writes e's file. The caller holds e.mu, or is e's adder.
func (j *journal) write(e *journalEntry) error {
	if j.dir == "" {
		return nil
	}
	b, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return fmt.Errorf("writing journal entry %s: %w", e.name(), err)
	}
	p := j.path(e)
	f, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return fmt.Errorf("writing journal entry %s: %w", e.name(), err)
	}
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing journal entry %s: %w", e.name(), err)
	}
	if err := os.Rename(f.Name(), p); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing journal entry %s: %w", e.name(), err)
	}
	if err := j.dirSync.sync(); err != nil {
		return fmt.Errorf("writing journal entry %s: %w", e.name(), err)
	}
	return nil
}

// dirSync syncs a directory for many writers at once: each waits for a sync that started
// after it asked (so after its rename), and one sync serves every writer that asked while
// the one before it ran.
type dirSync struct {
	dir string

	mu      sync.Mutex
	cond    *sync.Cond // on mu: a sync ended
	running bool
	// started and done count the syncs begun and ended; err is the newest ended one's.
	started, done uint64
	err           error
}

func (s *dirSync) sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cond == nil {
		s.cond = sync.NewCond(&s.mu)
	}
	want := s.started + 1 // the next to start: one running now may predate the rename
	for s.done < want {
		if s.running {
			s.cond.Wait()
			continue
		}
		s.running = true
		s.started++
		n := s.started
		s.mu.Unlock()
		err := syncDir(s.dir)
		s.mu.Lock()
		s.running, s.done, s.err = false, n, err
		s.cond.Broadcast()
	}
	return s.err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	serr := d.Sync()
	cerr := d.Close()
	if err := errors.Join(serr, cerr); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
