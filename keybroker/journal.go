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
	// Keys and Epoch are kindCleanup's keys and the epoch it must not leave behind.
	Keys        []string  `json:"keys,omitempty"`
	Epoch       uint64    `json:"epoch,omitempty"`
	RequestedAt time.Time `json:"requestedAt"`
	// Destroyed are the keys deleted so far, with their last versions.
	Destroyed []receipt.DestroyedKey `json:"destroyed,omitempty"`
	Attempts  int                    `json:"attempts"`

	mu   sync.Mutex    // serializes attempts
	done chan struct{} // closed when the entry completes or is dropped
	err  error         // why it was dropped, if it was
}

func (e *journalEntry) name() string { return e.Kind + "-" + e.MigrationID }

// journal holds pending destructions, in memory and, with a directory, one JSON file each
// (written to a temporary file, synced and renamed, so that a crash leaves the old or the new
// entry, never a torn one).
type journal struct {
	dir string

	mu      sync.Mutex
	entries map[string]*journalEntry
}

func openJournal(dir string) (*journal, error) {
	j := &journal{dir: dir, entries: map[string]*journalEntry{}}
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
		e.done = make(chan struct{})
		j.entries[e.name()] = e
	}
	return j, nil
}

// add records e, or returns the entry already pending under its name. It refuses an ending
// of a migration whose other ending is pending (ErrBothEpochs).
func (j *journal) add(e *journalEntry) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if old, ok := j.entries[e.name()]; ok {
		if old.Ending != e.Ending {
			return fmt.Errorf("migration %s has a pending %s: %w", e.MigrationID, old.Ending, ErrBothEpochs)
		}
		return nil
	}
	e.done = make(chan struct{})
	if err := j.writeLocked(e); err != nil {
		return err
	}
	j.entries[e.name()] = e
	return nil
}

// get returns the pending entry of that kind and migration, or nil.
func (j *journal) get(kind, migrationID string) *journalEntry {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.entries[kind+"-"+migrationID]
}

// pending returns the pending entries, oldest first.
func (j *journal) pending() []*journalEntry {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]*journalEntry, 0, len(j.entries))
	for _, e := range j.entries {
		out = append(out, e)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].RequestedAt.Before(out[b].RequestedAt) })
	return out
}

// save persists e's progress. The caller holds e.mu.
func (j *journal) save(e *journalEntry) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.writeLocked(e)
}

// finish removes e (completed, or dropped with err) and wakes its waiters.
func (j *journal) finish(e *journalEntry, err error) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.entries[e.name()] != e {
		return nil
	}
	if j.dir != "" {
		if rerr := os.Remove(j.path(e)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("removing journal entry %s: %w", e.name(), rerr)
		}
	}
	delete(j.entries, e.name())
	e.err = err
	close(e.done)
	return nil
}

func (j *journal) path(e *journalEntry) string {
	return filepath.Join(j.dir, "destructions", e.name()+".json")
}

func (j *journal) writeLocked(e *journalEntry) error {
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
	if d, err := os.Open(filepath.Dir(p)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
