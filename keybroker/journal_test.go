package keybroker

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// TestJournalConcurrentAdds: destructions journaled at once, some of one migration twice,
// are each on disk once add returns (a journal opened again from the directory holds them
// all), a repeat gets the entry already pending, and an ending whose other ending is pending
// is refused.
func TestJournalConcurrentAdds(t *testing.T) {
	dir := t.TempDir()
	j, err := openJournal(dir)
	if err != nil {
		t.Fatal(err)
	}
	const migrations = 32
	entry := func(i int, ending kbwire.Ending) *journalEntry {
		return &journalEntry{
			Kind: kindDestroy, MigrationID: fmt.Sprintf("m%d", i), Tenant: "demo", VM: fmt.Sprintf("vm%d", i),
			Ending: ending, RequestedAt: time.Date(2026, 3, 1, 12, 0, i, 0, time.UTC),
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 2*migrations)
	for i := range migrations {
		for k := range 2 {
			wg.Go(func() { errs[2*i+k] = j.add(entry(i, kbwire.Commit)) })
		}
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("add %d: %v", i, err)
		}
	}
	if got := len(j.pending()); got != migrations {
		t.Errorf("%d pending, want %d", got, migrations)
	}
	if err := j.add(entry(0, kbwire.Abort)); err == nil {
		t.Error("an abort of a migration whose commit is pending was journaled")
	}

	reopened, err := openJournal(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range migrations {
		e := reopened.get(kindDestroy, fmt.Sprintf("m%d", i))
		if e == nil || e.Ending != kbwire.Commit || e.VM != fmt.Sprintf("vm%d", i) {
			t.Errorf("m%d on disk: %+v", i, e)
		}
	}

	// Progress saved and finishing, one entry at a time as attempt does, reach the disk.
	e := j.get(kindDestroy, "m1")
	e.mu.Lock()
	e.Attempts = 3
	if err := j.save(e); err != nil {
		t.Fatal(err)
	}
	e.mu.Unlock()
	done := j.get(kindDestroy, "m2")
	done.mu.Lock()
	err = j.finish(done, nil)
	done.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if reopened, err = openJournal(dir); err != nil {
		t.Fatal(err)
	}
	if got := reopened.get(kindDestroy, "m1"); got == nil || got.Attempts != 3 {
		t.Errorf("m1 after save: %+v, want 3 attempts", got)
	}
	if got := reopened.get(kindDestroy, "m2"); got != nil {
		t.Errorf("m2 still on disk after finish: %+v", got)
	}
}
