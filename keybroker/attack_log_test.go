package keybroker

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// Attacks on the residency log: each test states a claim and asserts that the attack on it
// fails.

// migrateVM releases and commits migration id of vm on e's keybroker.
func (e *env) migrateVM(id, vm string) *kbwire.DestroyResponse {
	e.t.Helper()
	m := e.newMigration(id, vm, "destination", e.signedPolicy(1, nil))
	rel, err := e.kb.Release(e.t.Context(), m.req)
	if err != nil {
		e.t.Fatalf("releasing %s: %v", id, err)
	}
	resp, err := e.kb.Destroy(e.t.Context(), e.commit(m, rel))
	if err != nil {
		e.t.Fatalf("committing %s: %v", id, err)
	}
	return resp
}

// leafAt reads entry i of the log straight from Vault.
func (e *env) leafAt(i uint64) []byte {
	e.t.Helper()
	var rec logEntryRecord
	if _, err := e.kb.recs.get(e.t.Context(), logEntryPath(i), &rec); err != nil {
		e.t.Fatal(err)
	}
	return rec.Leaf
}

// headOf reads the log's head straight from Vault.
func (e *env) headOf() logHeadRecord {
	e.t.Helper()
	var h logHeadRecord
	if _, err := e.kb.recs.get(e.t.Context(), logHeadPath, &h); err != nil {
		e.t.Fatal(err)
	}
	return h
}

// forgeHead rewrites the head over the leaves as stored in Vault now (what an attacker with KV
// write access, but no signing key, can compute).
func (e *env) forgeHead(size uint64) {
	e.t.Helper()
	var tr tlog.Tree
	r := rangeFactory.NewEmptyRange(0)
	for i := range size {
		h := tlog.LeafHash(e.leafAt(i))
		tr.Append(h)
		if err := r.Append(h, nil); err != nil {
			e.t.Fatal(err)
		}
	}
	e.kvPut(logHeadPath, map[string]any{"size": size, "range": r.Hashes()})
}

// pin returns the newest signed checkpoint, opened, as a tenant pins it.
func (e *env) pin(kb *Keybroker) *tlog.Signed {
	e.t.Helper()
	r, err := kb.LogCheckpoint(e.t.Context(), &kbwire.LogCheckpointRequest{})
	if err != nil {
		e.t.Fatal(err)
	}
	cp, err := tlog.Open(r.Checkpoint, e.logVerifier(), nil, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	return cp
}

// auditHistory is what a tenant holding pinned does: fetch vm's history, open its checkpoint,
// check it extends pinned, and verify the history. It returns the report or the first error.
func (e *env) auditHistory(kb *Keybroker, vm string, pinned *tlog.Signed) (*tlog.HistoryReport, error) {
	e.t.Helper()
	h, err := kb.LogHistory(e.t.Context(), &kbwire.LogHistoryRequest{Tenant: "demo", VM: vm})
	if err != nil {
		return nil, err
	}
	cp, err := tlog.Open(h.Checkpoint, e.logVerifier(), nil, 0)
	if err != nil {
		return nil, err
	}
	if pinned != nil {
		var proof [][]byte
		if cp.Size > pinned.Size {
			p, err := kb.LogConsistency(e.t.Context(), &kbwire.LogConsistencyRequest{From: pinned.Size, To: cp.Size})
			if err != nil {
				return nil, err
			}
			proof = p.Proof
		}
		if err := tlog.CheckExtends(pinned.Checkpoint, cp.Checkpoint, proof); err != nil {
			return nil, err
		}
	}
	return tlog.VerifyHistory(cp, h)
}

// kinds lists a report's entries as kind:migration.
func kinds(rep *tlog.HistoryReport) string {
	var out []string
	for _, en := range rep.Entries {
		out = append(out, string(en.Kind)+":"+en.MigrationID)
	}
	return strings.Join(out, " ")
}

// TestAttackLogStoredCheckpointSwapped (claim 6): someone with KV write access stores a
// genuine, older checkpoint under the newest checkpoint's size. The keybroker must not serve
// it as the newest: a history proven against it leaves out the guest's newest entries, and
// verifies.
func TestAttackLogStoredCheckpointSwapped(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	old := e.pin(e.kb) // size 1, signed and stored
	e.migrateVM("m1", "vm1")
	head := e.headOf()
	if _, err := e.kb.LogCheckpoint(t.Context(), &kbwire.LogCheckpointRequest{}); err != nil {
		t.Fatal(err)
	}
	e.kvPut(logCheckpointPath(head.Size), map[string]any{"note": old.Note})

	rep, err := e.auditHistory(e.second(), "vm1", nil)
	if err == nil {
		t.Errorf("a history proven against a swapped checkpoint verified, silently truncated to %q (log of %d entries)", kinds(rep), head.Size)
	} else if !errors.Is(err, ErrLogCorrupted) {
		t.Errorf("history with a swapped checkpoint = %v, want ErrLogCorrupted", err)
	}
	if _, err := e.kb.LogCheckpoint(t.Context(), &kbwire.LogCheckpointRequest{}); !errors.Is(err, ErrLogCorrupted) {
		t.Errorf("newest checkpoint with a swapped record = %v, want ErrLogCorrupted", err)
	}
}

// TestAttackLogGuestRecordRolledBack (claims 2 and 6): someone with KV write access rolls a
// guest's log record back to an older entry of the guest, to hide a migration. The keybroker
// must not serve the shortened chain as the guest's history, nor fork the chain at the next
// append.
func TestAttackLogGuestRecordRolledBack(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	e.migrateVM("m1", "vm1")
	saved := e.kvGet(logGuestPath("demo", "vm1"))
	e.migrateVM("m2", "vm1") // the migration to hide
	pinned := e.pin(e.kb)

	// The record as it was after m1: seq 3, the commit of m1. The history is still the
	// log's: m2 is in it.
	e.kvPut(logGuestPath("demo", "vm1"), saved)
	const full = "adopt:adopt-vm1 release:m1 commit:m1 release:m2 commit:m2"
	if rep, err := e.auditHistory(e.second(), "vm1", pinned); err != nil {
		t.Errorf("history with a rolled-back guest record: %v", err)
	} else if got := kinds(rep); got != full {
		t.Errorf("a rolled-back guest record hid entries: the history is %q, want %q", got, full)
	}

	// The next decision chains onto the rolled-back record (the keybroker trusts it when
	// appending): the fork is in the log for every verifier to see, never a shorter chain
	// that verifies.
	if _, err := e.second().logDecision(ctx, &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", MigrationID: "m-next", Op: "release"}); err != nil {
		t.Fatal(err)
	}
	if rep, err := e.auditHistory(e.second(), "vm1", pinned); err == nil {
		t.Errorf("after an append on the rolled-back record, the history verifies: %q", kinds(rep))
	} else if !errors.Is(err, tlog.ErrIncomplete) && !errors.Is(err, ErrLogCorrupted) {
		t.Errorf("history of the forked chain = %v, want ErrIncomplete or ErrLogCorrupted", err)
	}
}

// Keep imports used by later tests.
var (
	_ = bytes.Equal
	_ = ed25519.GenerateKey
	_ = rand.Reader
	_ = http.MethodGet
	_ = time.Second
	_ = note.Sign
	_ = attest.RoleAdopt
	_ = keybrokertest.CleanStatement
	_ = vaulttest.KVMount
)
