package tlog

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lethe-cc/lethe/attest"
)

// testLog appends entries as the keybroker does: each guest's entries chained by Seq and Prev.
type testLog struct {
	t      testing.TB
	tree   Tree
	leaves [][]byte
	heads  map[string]*Link // a guest's newest entry
	seqs   map[string]uint64
	now    time.Time
}

func newTestLog(t testing.TB) *testLog {
	return &testLog{t: t, heads: map[string]*Link{}, seqs: map[string]uint64{}, now: pinnedTime}
}

// add chains e to its guest's entries and appends it; it returns the entry's index.
func (l *testLog) add(e Entry) uint64 {
	l.t.Helper()
	guest := e.Tenant + "/" + e.VM
	l.seqs[guest]++
	e.Type, e.Seq, e.Prev = EntryType, l.seqs[guest], l.heads[guest]
	l.now = l.now.Add(time.Minute)
	e.Time = l.now
	leaf, err := e.Marshal()
	if err != nil {
		l.t.Fatal(err)
	}
	index := uint64(len(l.leaves))
	l.leaves = append(l.leaves, leaf)
	l.tree.Append(LeafHash(leaf))
	l.heads[guest] = &Link{Index: index, Hash: LeafHash(leaf)}
	return index
}

// checkpoint signs and opens the log's current checkpoint.
func (l *testLog) checkpoint() *Signed {
	l.t.Helper()
	root, err := l.tree.Root(l.tree.Size())
	if err != nil {
		l.t.Fatal(err)
	}
	c := Checkpoint{Origin: testOrigin, Size: l.tree.Size(), Root: root}
	k := testKey(1)
	s, err := Open(signCheckpoint(l.t, c, k), logVerifier(l.t, testOrigin, k), nil, 0)
	if err != nil {
		l.t.Fatalf("Open: %v", err)
	}
	return s
}

// history returns what the keybroker answers for a guest: its entries, proven against the
// current checkpoint.
func (l *testLog) history(tenant, vm string) (*Signed, *History) {
	l.t.Helper()
	cp := l.checkpoint()
	h := &History{Tenant: tenant, VM: vm, Checkpoint: cp.Note}
	for i, leaf := range l.leaves {
		e, err := ParseEntry(leaf)
		if err != nil {
			l.t.Fatal(err)
		}
		if e.Tenant != tenant || e.VM != vm {
			continue
		}
		h.Entries = append(h.Entries, l.proven(uint64(i), cp.Size))
	}
	return cp, h
}

func (l *testLog) proven(index, size uint64) ProvenEntry {
	l.t.Helper()
	p, err := l.tree.InclusionProof(index, size)
	if err != nil {
		l.t.Fatal(err)
	}
	return ProvenEntry{Index: index, Leaf: l.leaves[index], Proof: p}
}

func digest(s string) attest.HexBytes { return StatementDigest([]byte(s)) }

// guestHistory is guest acme/vm1's decisions, oldest first: adopted on h1, migrated to h2
// (m1, committed), a migration to h3 released and aborted (m2), migrated to h4 (m3,
// committed), its key reissued to h4's restarted agent; two requests denied.
func guestHistory() []Entry {
	g := func(e Entry) Entry { e.Tenant, e.VM = "acme", "vm1"; return e }
	return []Entry{
		g(Entry{Kind: KindAdopt, MigrationID: "adopt-1", FromEpoch: 0, ToEpoch: 1, Host: "h1", Statement: digest("grant adopt-1")}),
		g(Entry{Kind: KindDeny, MigrationID: "m0", FromEpoch: 1, ToEpoch: 2, Op: "release", Reasons: []string{"destination measurement not allowed"}}),
		g(Entry{Kind: KindRelease, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Host: "h2", Statement: digest("grant m1"),
			Evidence: []attest.HexBytes{digest("src m1"), digest("dst m1")}}),
		g(Entry{Kind: KindCommit, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Statement: digest("receipt m1"), Outcome: "committed",
			DestroyedKeys: []string{MigrationKey("m1"), EpochKey("acme", "vm1", 1)}}),
		g(Entry{Kind: KindRelease, MigrationID: "m2", FromEpoch: 2, ToEpoch: 3, Host: "h3", Statement: digest("grant m2")}),
		g(Entry{Kind: KindAbort, MigrationID: "m2", FromEpoch: 2, ToEpoch: 3, Statement: digest("receipt m2"), Outcome: "aborted",
			DestroyedKeys: []string{MigrationKey("m2"), EpochKey("acme", "vm1", 3)}}),
		g(Entry{Kind: KindRelease, MigrationID: "m3", FromEpoch: 2, ToEpoch: 3, Host: "h4", Statement: digest("grant m3")}),
		g(Entry{Kind: KindDeny, MigrationID: "r0", FromEpoch: 2, ToEpoch: 2, Op: "reissue", Reasons: []string{"host h9 is not the guest's"}}),
		g(Entry{Kind: KindCommit, MigrationID: "m3", FromEpoch: 2, ToEpoch: 3, Statement: digest("receipt m3"), Outcome: "committed",
			DestroyedKeys: []string{MigrationKey("m3"), EpochKey("acme", "vm1", 2)}}),
		g(Entry{Kind: KindReissue, MigrationID: "r1", FromEpoch: 3, ToEpoch: 3, Host: "h4", Statement: digest("grant r1")}),
	}
}

// otherGuests are entries of other guests, interleaved with acme/vm1's.
func otherGuests(i int) []Entry {
	switch i % 3 {
	case 0:
		return []Entry{{Kind: KindAdopt, Tenant: "acme", VM: fmt.Sprintf("vm%d", 100+i), MigrationID: fmt.Sprintf("adopt-x%d", i), ToEpoch: 1, Host: "h5"}}
	case 1:
		return []Entry{{Kind: KindDeny, Tenant: "globex", VM: "vm1", MigrationID: fmt.Sprintf("d%d", i), Op: "adopt", Reasons: []string{"no policy"}}}
	}
	return nil
}

// buildLog appends entries of acme/vm1 with other guests' between them.
func buildLog(t *testing.T, entries []Entry) *testLog {
	l := newTestLog(t)
	for i, e := range entries {
		for _, o := range otherGuests(i) {
			l.add(o)
		}
		l.add(e)
	}
	for _, o := range otherGuests(len(entries)) {
		l.add(o)
	}
	return l
}

func TestVerifyHistory(t *testing.T) {
	l := buildLog(t, guestHistory())
	cp, h := l.history("acme", "vm1")
	if len(h.Entries) != len(guestHistory()) || l.tree.Size() <= uint64(len(h.Entries)) {
		t.Fatalf("the log holds %d entries, the guest %d: other guests' are not interleaved", l.tree.Size(), len(h.Entries))
	}
	rep, err := VerifyHistory(cp, h)
	if err != nil {
		t.Fatalf("VerifyHistory: %v", err)
	}
	want := &HistoryReport{
		Checkpoint: cp.Checkpoint,
		Live:       3,
		Residencies: []Residency{
			{Epoch: 1, Hosts: []string{"h1"}, Began: "adopt-1", Ended: "m1"},
			{Epoch: 2, Hosts: []string{"h2"}, Began: "m1", Ended: "m3"},
			{Epoch: 3, Hosts: []string{"h4", "h4"}, Began: "m3"},
		},
		Denials: 2,
	}
	if diff := cmp.Diff(want, rep, cmpopts.IgnoreFields(HistoryReport{}, "Entries")); diff != "" {
		t.Errorf("VerifyHistory (-want +got):\n%s", diff)
	}
	if len(rep.Entries) != len(h.Entries) || rep.Entries[3].Kind != KindCommit || rep.Entries[3].MigrationID != "m1" {
		t.Errorf("VerifyHistory reported entries %v", rep.Entries)
	}

	// A history that ends in a released migration reports it in progress.
	l = buildLog(t, guestHistory()[:7])
	cp, h = l.history("acme", "vm1")
	rep, err = VerifyHistory(cp, h)
	if err != nil {
		t.Fatalf("VerifyHistory up to m3's release: %v", err)
	}
	if rep.Live != 2 || !cmp.Equal(rep.InProgress, []string{"m3"}) {
		t.Errorf("VerifyHistory up to m3's release: live %d, in progress %v; want 2, [m3]", rep.Live, rep.InProgress)
	}
}

// The guest's history JSON round-trips: what lethectl receives is what the keybroker sent.
func TestHistoryJSON(t *testing.T) {
	l := buildLog(t, guestHistory())
	cp, h := l.history("acme", "vm1")
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	var got History
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(h, &got); diff != "" {
		t.Errorf("History after JSON (-want +got):\n%s", diff)
	}
	if _, err := VerifyHistory(cp, &got); err != nil {
		t.Errorf("VerifyHistory after JSON: %v", err)
	}
}

func TestVerifyHistoryDetectsTampering(t *testing.T) {
	entries := guestHistory()
	changed := func(i int, f func(*Entry)) []Entry {
		es := slices.Clone(entries)
		f(&es[i])
		return es
	}
	honest := func(t *testing.T) (*Signed, *History, *testLog) {
		l := buildLog(t, entries)
		cp, h := l.history("acme", "vm1")
		return cp, h, l
	}
	fromLog := func(es []Entry) func(t *testing.T) (*Signed, *History, *testLog) {
		return func(t *testing.T) (*Signed, *History, *testLog) {
			l := buildLog(t, es)
			cp, h := l.history("acme", "vm1")
			return cp, h, l
		}
	}
	edited := func(edit func(t *testing.T, h *History, l *testLog)) func(t *testing.T) (*Signed, *History, *testLog) {
		return func(t *testing.T) (*Signed, *History, *testLog) {
			cp, h, l := honest(t)
			edit(t, h, l)
			return cp, h, l
		}
	}

	for name, tc := range map[string]struct {
		history func(t *testing.T) (*Signed, *History, *testLog)
		want    []string // each in the error
	}{
		"entry deleted": {
			edited(func(_ *testing.T, h *History, _ *testLog) { h.Entries = slices.Delete(h.Entries, 3, 4) }),
			[]string{"seq 5 where 4 was due", "the chain is broken"},
		},
		"first entry deleted": {
			edited(func(_ *testing.T, h *History, _ *testLog) { h.Entries = h.Entries[1:] }),
			[]string{"seq 2 where 1 was due", "none came before"},
		},
		"entries swapped": {
			edited(func(_ *testing.T, h *History, _ *testLog) { h.Entries[4], h.Entries[5] = h.Entries[5], h.Entries[4] }),
			[]string{"seq 6 where 5 was due", "seq 5 where 6 was due", "the chain is broken"},
		},
		"entry altered after the fact": {
			edited(func(t *testing.T, h *History, _ *testLog) {
				leaf := bytes.Replace(h.Entries[2].Leaf, []byte(`"host":"h2"`), []byte(`"host":"h7"`), 1)
				if bytes.Equal(leaf, h.Entries[2].Leaf) {
					t.Fatal("host not in the leaf")
				}
				h.Entries[2].Leaf = leaf
			}),
			[]string{"entry 4 (seq 3): not in the log", "does not name the guest's previous entry 4"},
		},
		"another guest's entry inserted": {
			edited(func(_ *testing.T, h *History, l *testLog) {
				h.Entries = slices.Insert(h.Entries, 2, l.proven(0, l.tree.Size()))
			}),
			[]string{"names guest acme/vm100, not acme/vm1", "the chain is broken"},
		},
		"forged inclusion proof": {
			edited(func(_ *testing.T, h *History, _ *testLog) {
				p := clonePath(h.Entries[6].Proof)
				p[0][0] ^= 0x80
				h.Entries[6].Proof = p
			}),
			[]string{"(seq 7): not in the log"},
		},
		"another index's proof": {
			edited(func(_ *testing.T, h *History, _ *testLog) { h.Entries[6].Proof = h.Entries[5].Proof }),
			[]string{"(seq 7): not in the log"},
		},
		"entry claimed at another index": {
			edited(func(_ *testing.T, h *History, _ *testLog) { h.Entries[6].Index++ }),
			[]string{"(seq 7): not in the log"},
		},
		"newest entries against an older checkpoint": {
			func(t *testing.T) (*Signed, *History, *testLog) {
				old, _, l := honest(t)
				l.add(Entry{Kind: KindDeny, Tenant: "acme", VM: "vm1", MigrationID: "late", Op: "release"})
				_, h := l.history("acme", "vm1")
				return old, h, l
			},
			[]string{"(seq 11): not in the log"},
		},
		"commit not destroying the old epoch key": {
			fromLog(changed(3, func(e *Entry) { e.DestroyedKeys = []string{MigrationKey("m1")} })),
			[]string{"entry 6 (commit of m1): does not destroy the migration key and epoch 1"},
		},
		"commit not destroying the migration key": {
			fromLog(changed(8, func(e *Entry) { e.DestroyedKeys = []string{EpochKey("acme", "vm1", 2)} })),
			[]string{"(commit of m3): does not destroy the migration key and epoch 2"},
		},
		"abort not destroying the abandoned epoch key": {
			fromLog(changed(5, func(e *Entry) { e.DestroyedKeys = []string{MigrationKey("m2"), EpochKey("acme", "vm1", 2)} })),
			[]string{"(abort of m2): does not destroy the migration key and epoch 3"},
		},
		"release skipping an epoch": {
			fromLog(changed(4, func(e *Entry) { e.ToEpoch = 4 })),
			[]string{"(release of m2): release from epoch 2 to 4 while epoch 2 is live"},
		},
		"release from an ended epoch": {
			fromLog(changed(6, func(e *Entry) { e.FromEpoch, e.ToEpoch = 1, 2 })),
			[]string{"(release of m3): release from epoch 1 to 2 while epoch 2 is live", "commit of a migration never released"},
		},
		"second adoption": {
			fromLog(append(slices.Clone(entries), Entry{Kind: KindAdopt, Tenant: "acme", VM: "vm1", MigrationID: "adopt-2", ToEpoch: 1, Host: "h9"})),
			[]string{"(adopt of adopt-2): adoption into epoch 1 while epoch 3 is live"},
		},
		"commit never released": {
			fromLog(slices.Delete(slices.Clone(entries), 6, 7)),
			[]string{"(commit of m3): commit of a migration never released"},
		},
		"release during another migration": {
			fromLog(slices.Insert(slices.Clone(entries), 3, Entry{Kind: KindRelease, Tenant: "acme", VM: "vm1", MigrationID: "m9", FromEpoch: 1, ToEpoch: 2, Host: "h9"})),
			[]string{"(release of m9): released while migration m1 is in progress"},
		},
		"release after the migration ended": {
			fromLog(slices.Insert(slices.Clone(entries), 6, Entry{Kind: KindRelease, Tenant: "acme", VM: "vm1", MigrationID: "m2", FromEpoch: 2, ToEpoch: 3, Host: "h3"})),
			[]string{"(release of m2): released after it ended"},
		},
		"repeated commit with a different statement": {
			fromLog(append(slices.Clone(entries), changed(8, func(e *Entry) { e.Statement = digest("another receipt m3") })[8])),
			[]string{"entry 18 (commit of m3): ended again, differently"},
		},
		"commit repeated as abort": {
			fromLog(append(slices.Clone(entries), changed(8, func(e *Entry) { e.Kind = KindAbort })[8])),
			[]string{"(abort of m3): ended again, differently"},
		},
		"reissue of an ended epoch": {
			fromLog(changed(9, func(e *Entry) { e.FromEpoch, e.ToEpoch = 2, 2 })),
			[]string{"(reissue of r1): reissue of epoch 2 while epoch 3 is live"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			cp, h, _ := tc.history(t)
			_, err := VerifyHistory(cp, h)
			if !errors.Is(err, ErrIncomplete) {
				t.Fatalf("VerifyHistory: %v, want ErrIncomplete", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("VerifyHistory: %v\ndoes not say %q", err, w)
				}
			}
		})
	}
}

func TestVerifyHistoryAcceptsRepeatedIdenticalEnding(t *testing.T) {
	entries := guestHistory()
	entries = append(entries, entries[8]) // the commit of m3, retried
	l := buildLog(t, entries)
	cp, h := l.history("acme", "vm1")
	rep, err := VerifyHistory(cp, h)
	if err != nil {
		t.Fatalf("VerifyHistory: %v", err)
	}
	if rep.Live != 3 || len(rep.Residencies) != 3 || rep.Residencies[1].Ended != "m3" {
		t.Errorf("VerifyHistory: live %d, residencies %+v", rep.Live, rep.Residencies)
	}
}

func TestVerifyHistoryCleanup(t *testing.T) {
	g := func(e Entry) Entry { e.Tenant, e.VM = "acme", "vm2"; return e }
	adopt := func(id, host string) Entry {
		return g(Entry{Kind: KindAdopt, MigrationID: id, ToEpoch: 1, Host: host})
	}
	cleanup := func(id string, keys ...string) Entry {
		return g(Entry{Kind: KindCleanup, MigrationID: id, DestroyedKeys: keys})
	}
	verify := func(t *testing.T, entries []Entry) (*HistoryReport, error) {
		t.Helper()
		l := newTestLog(t)
		for _, e := range entries {
			l.add(e)
		}
		cp, h := l.history("acme", "vm2")
		return VerifyHistory(cp, h)
	}

	t.Run("failed adoption, adopted again", func(t *testing.T) {
		rep, err := verify(t, []Entry{
			adopt("adopt-1", "h1"),
			cleanup("adopt-1", EpochKey("acme", "vm2", 1)),
			g(Entry{Kind: KindDeny, MigrationID: "adopt-2", Op: "adopt", Reasons: []string{"measurement"}}),
			adopt("adopt-3", "h2"),
		})
		if err != nil {
			t.Fatalf("VerifyHistory: %v", err)
		}
		want := []Residency{{Epoch: 1, Hosts: []string{"h2"}, Began: "adopt-3"}}
		if diff := cmp.Diff(want, rep.Residencies); diff != "" || rep.Live != 1 || rep.Denials != 1 {
			t.Errorf("VerifyHistory: live %d, denials %d, residencies (-want +got):\n%s", rep.Live, rep.Denials, diff)
		}
	})
	t.Run("failed adoption", func(t *testing.T) {
		rep, err := verify(t, []Entry{adopt("adopt-1", "h1"), cleanup("adopt-1", EpochKey("acme", "vm2", 1))})
		if err != nil {
			t.Fatalf("VerifyHistory: %v", err)
		}
		if rep.Live != 0 || len(rep.Residencies) != 0 {
			t.Errorf("VerifyHistory: live %d, residencies %+v; want not adopted", rep.Live, rep.Residencies)
		}
	})
	t.Run("failed adoption, key kept", func(t *testing.T) {
		_, err := verify(t, []Entry{adopt("adopt-1", "h1"), cleanup("adopt-1")})
		if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "does not destroy epoch 1") {
			t.Errorf("VerifyHistory: %v, want ErrIncomplete: does not destroy epoch 1", err)
		}
	})
	t.Run("failed release", func(t *testing.T) {
		rep, err := verify(t, []Entry{
			adopt("adopt-1", "h1"),
			g(Entry{Kind: KindRelease, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Host: "h2"}),
			cleanup("m1", MigrationKey("m1"), EpochKey("acme", "vm2", 2)),
			g(Entry{Kind: KindRelease, MigrationID: "m2", FromEpoch: 1, ToEpoch: 2, Host: "h3"}),
		})
		if err != nil {
			t.Fatalf("VerifyHistory: %v", err)
		}
		if rep.Live != 1 || !cmp.Equal(rep.InProgress, []string{"m2"}) {
			t.Errorf("VerifyHistory: live %d, in progress %v; want 1, [m2]", rep.Live, rep.InProgress)
		}
	})
	t.Run("failed release, keys kept", func(t *testing.T) {
		_, err := verify(t, []Entry{
			adopt("adopt-1", "h1"),
			g(Entry{Kind: KindRelease, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Host: "h2"}),
			cleanup("m1", MigrationKey("m1")),
		})
		if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "does not destroy the migration key and epoch 2") {
			t.Errorf("VerifyHistory: %v, want ErrIncomplete: does not destroy the migration key and epoch 2", err)
		}
	})
}

func TestVerifyHistoryMalformedEntry(t *testing.T) {
	l := buildLog(t, guestHistory())
	cp, h := l.history("acme", "vm1")
	h.Entries[1].Leaf = []byte(`{"type":"lethe.dev/v1/LogEntry"}`)
	if _, err := VerifyHistory(cp, h); !errors.Is(err, ErrMalformed) {
		t.Errorf("VerifyHistory: %v, want ErrMalformed", err)
	}
}

func TestParseEntry(t *testing.T) {
	l := buildLog(t, guestHistory())
	for i, leaf := range l.leaves {
		e, err := ParseEntry(leaf)
		if err != nil {
			t.Fatalf("ParseEntry(leaf %d): %v", i, err)
		}
		if again, _ := e.Marshal(); !bytes.Equal(again, leaf) {
			t.Errorf("leaf %d re-encodes differently:\n%s\n%s", i, leaf, again)
		}
	}
	valid := string(l.leaves[1])
	for bad, leaf := range map[string]string{
		"not JSON":           "adopt",
		"unknown field":      strings.Replace(valid, `{"type"`, `{"extra":1,"type"`, 1),
		"trailing data":      valid + "{}",
		"wrong type":         strings.Replace(valid, EntryType, "lethe.dev/v2/LogEntry", 1),
		"unknown kind":       strings.Replace(valid, `"kind":"adopt"`, `"kind":"grant"`, 1),
		"no tenant":          strings.Replace(valid, `"tenant":"acme"`, `"tenant":""`, 1),
		"no vm":              strings.Replace(valid, `"vm":"vm1"`, `"vm":""`, 1),
		"seq 0":              strings.Replace(valid, `"seq":1`, `"seq":0`, 1),
		"seq 2 without prev": strings.Replace(valid, `"seq":1`, `"seq":2`, 1),
		"seq 1 with prev":    strings.Replace(valid, `"seq":1`, `"seq":1,"prev":{"index":0,"hash":"00"}`, 1),
		"statement not hex":  strings.Replace(valid, `"statement":"`, `"statement":"zz`, 1),
		"empty":              "",
	} {
		t.Run(bad, func(t *testing.T) {
			if leaf == valid {
				t.Fatalf("the edit did not apply to %s", valid)
			}
			if _, err := ParseEntry([]byte(leaf)); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseEntry(%s): %v, want ErrMalformed", leaf, err)
			}
		})
	}
}

func FuzzParseEntry(f *testing.F) {
	l := newTestLog(f)
	for _, e := range guestHistory() {
		l.add(e)
	}
	for _, leaf := range l.leaves {
		f.Add(leaf)
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"type":"lethe.dev/v1/LogEntry","kind":"adopt","tenant":"a","vm":"b","seq":1,"migrationId":"x","fromEpoch":0,"toEpoch":1,"time":"2026-01-01T00:00:00Z"} `))
	f.Add([]byte(`{"type":"lethe.dev/v1/LogEntry","kind":"deny","tenant":"a","vm":"b","seq":2,"prev":{"index":1,"hash":"ab"},"migrationId":"x","fromEpoch":0,"toEpoch":0,"time":"2026-01-01T00:00:00Z"}`))
	f.Fuzz(func(t *testing.T, leaf []byte) {
		e, err := ParseEntry(leaf)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseEntry: %v, not ErrMalformed", err)
			}
			return
		}
		b, err := e.Marshal()
		if err != nil {
			t.Fatalf("Marshal of a parsed entry: %v", err)
		}
		again, err := ParseEntry(b)
		if err != nil {
			t.Fatalf("ParseEntry(Marshal(ParseEntry(%q))): %v", leaf, err)
		}
		if diff := cmp.Diff(e, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("an entry changed by re-encoding (-first +again):\n%s", diff)
		}
	})
}

// TestVerifyHistoryForget: a forget destroys the live epoch's key and ends the guest's
// adoption, after which it may be adopted again; a forget of a guest not adopted, of another
// epoch than the live one, keeping the key, or while a migration is released and not ended
// is refused.
func TestVerifyHistoryForget(t *testing.T) {
	g := func(e Entry) Entry { e.Tenant, e.VM = "acme", "vm3"; return e }
	adopt := func(id, host string) Entry {
		return g(Entry{Kind: KindAdopt, MigrationID: id, ToEpoch: 1, Host: host})
	}
	forget := func(id string, from uint64, keys ...string) Entry {
		return g(Entry{Kind: KindForget, MigrationID: id, FromEpoch: from, Statement: digest("statement " + id), DestroyedKeys: keys})
	}
	release := g(Entry{Kind: KindRelease, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Host: "h2"})
	commit := g(Entry{Kind: KindCommit, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Statement: digest("receipt m1"),
		DestroyedKeys: []string{MigrationKey("m1"), EpochKey("acme", "vm3", 1)}})
	verify := func(t *testing.T, entries []Entry) (*HistoryReport, error) {
		t.Helper()
		l := newTestLog(t)
		for _, e := range entries {
			l.add(e)
		}
		cp, h := l.history("acme", "vm3")
		return VerifyHistory(cp, h)
	}

	t.Run("adopted, migrated, forgotten, adopted again", func(t *testing.T) {
		rep, err := verify(t, []Entry{
			adopt("adopt-1", "h1"), release, commit,
			forget("f1", 2, EpochKey("acme", "vm3", 2)),
			adopt("adopt-2", "h3"),
		})
		if err != nil {
			t.Fatalf("VerifyHistory: %v", err)
		}
		want := []Residency{
			{Epoch: 1, Hosts: []string{"h1"}, Began: "adopt-1", Ended: "m1"},
			{Epoch: 2, Hosts: []string{"h2"}, Began: "m1", Ended: "f1"},
			{Epoch: 1, Hosts: []string{"h3"}, Began: "adopt-2"},
		}
		if diff := cmp.Diff(want, rep.Residencies); diff != "" || rep.Live != 1 {
			t.Errorf("VerifyHistory: live %d, residencies (-want +got):\n%s", rep.Live, diff)
		}
	})
	t.Run("forgotten", func(t *testing.T) {
		rep, err := verify(t, []Entry{adopt("adopt-1", "h1"), forget("f1", 1, EpochKey("acme", "vm3", 1))})
		if err != nil {
			t.Fatalf("VerifyHistory: %v", err)
		}
		if rep.Live != 0 || len(rep.Residencies) != 1 || rep.Residencies[0].Ended != "f1" {
			t.Errorf("VerifyHistory: live %d, residencies %+v; want not adopted, epoch 1 ended by f1", rep.Live, rep.Residencies)
		}
	})
	t.Run("failed adoption after a forget", func(t *testing.T) {
		rep, err := verify(t, []Entry{
			adopt("adopt-1", "h1"), forget("f1", 1, EpochKey("acme", "vm3", 1)),
			adopt("adopt-2", "h2"), g(Entry{Kind: KindCleanup, MigrationID: "adopt-2", DestroyedKeys: []string{EpochKey("acme", "vm3", 1)}}),
		})
		if err != nil {
			t.Fatalf("VerifyHistory: %v", err)
		}
		want := []Residency{{Epoch: 1, Hosts: []string{"h1"}, Began: "adopt-1", Ended: "f1"}}
		if diff := cmp.Diff(want, rep.Residencies); diff != "" || rep.Live != 0 {
			t.Errorf("VerifyHistory: live %d, residencies (-want +got):\n%s", rep.Live, diff)
		}
	})

	for name, tt := range map[string]struct {
		entries []Entry
		want    string
	}{
		"never adopted": {
			entries: []Entry{forget("f1", 0, EpochKey("acme", "vm3", 0))},
			want:    "forget of epoch 0 to 0 while epoch 0 is live",
		},
		"forgotten twice": {
			entries: []Entry{adopt("adopt-1", "h1"), forget("f1", 1, EpochKey("acme", "vm3", 1)), forget("f2", 1, EpochKey("acme", "vm3", 1))},
			want:    "forget of epoch 1 to 0 while epoch 0 is live",
		},
		"another epoch than the live one": {
			entries: []Entry{adopt("adopt-1", "h1"), release, commit, forget("f1", 1, EpochKey("acme", "vm3", 1))},
			want:    "forget of epoch 1 to 0 while epoch 2 is live",
		},
		"not to epoch 0": {
			entries: []Entry{adopt("adopt-1", "h1"), func() Entry { e := forget("f1", 1, EpochKey("acme", "vm3", 1)); e.ToEpoch = 2; return e }()},
			want:    "forget of epoch 1 to 2 while epoch 1 is live",
		},
		"key kept": {
			entries: []Entry{adopt("adopt-1", "h1"), forget("f1", 1)},
			want:    "does not destroy epoch 1",
		},
		"during a released migration": {
			entries: []Entry{adopt("adopt-1", "h1"), release, forget("f1", 1, EpochKey("acme", "vm3", 1))},
			want:    "forgotten while migration m1 is released and not ended",
		},
		"adopted again without a forget": {
			entries: []Entry{adopt("adopt-1", "h1"), forget("f1", 1), adopt("adopt-2", "h2")},
			want:    "adoption into epoch 1 while epoch 1 is live",
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := verify(t, tt.entries)
			if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("VerifyHistory: %v, want ErrIncomplete: %s", err, tt.want)
			}
		})
	}
}
