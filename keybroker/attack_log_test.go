package keybroker

import (
	"bytes"
	"context"
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
	if _, err := e.second().logDecision(ctx, &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", MigrationID: "m-next", Op: "release"}, true); err != nil {
		t.Fatal(err)
	}
	if rep, err := e.auditHistory(e.second(), "vm1", pinned); err == nil {
		t.Errorf("after an append on the rolled-back record, the history verifies: %q", kinds(rep))
	} else if !errors.Is(err, tlog.ErrIncomplete) && !errors.Is(err, ErrLogCorrupted) {
		t.Errorf("history of the forked chain = %v, want ErrIncomplete or ErrLogCorrupted", err)
	}
}

// statements returns the statements of vm's entries of kind, by migration.
func statements(rep *tlog.HistoryReport, kind tlog.Kind) map[string][][]byte {
	out := map[string][][]byte{}
	for _, en := range rep.Entries {
		if en.Kind == kind {
			out[en.MigrationID] = append(out[en.MigrationID], en.Statement)
		}
	}
	return out
}

// TestAttackLogEveryGrantHasItsEntry (claim 1): every grant that leaves the keybroker (an
// adoption, a release, a repeated release, a reissue) is in the guest's history, named by its
// digest; and none of them leaves while its entry cannot be appended.
func TestAttackLogEveryGrantHasItsEntry(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	var grants []struct {
		kind tlog.Kind
		id   string
		g    []byte
	}
	add := func(kind tlog.Kind, id string, g []byte) {
		grants = append(grants, struct {
			kind tlog.Kind
			id   string
			g    []byte
		}{kind, id, g})
	}
	ad := e.adopt("vm1")
	add(tlog.KindAdopt, "adopt-vm1", ad.Grant)
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	rel, err := e.kb.Release(ctx, m.req)
	if err != nil {
		t.Fatal(err)
	}
	add(tlog.KindRelease, "m1", rel.Grant)
	again := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil)) // the broker repeats its attestation
	rel2, err := e.kb.Release(ctx, again.req)
	if err != nil {
		t.Fatalf("repeated release: %v", err)
	}
	add(tlog.KindRelease, "m1", rel2.Grant)
	if _, err := e.kb.Destroy(ctx, e.commit(again, rel2)); err != nil {
		t.Fatal(err)
	}
	a := e.attest("destination", "reissue-1", attest.RoleAdopt, keybrokertest.CleanStatement(t))
	ri, err := e.kb.Reissue(ctx, &kbwire.ReissueRequest{ReissueID: "reissue-1", Tenant: "demo", VM: "vm1", Policy: e.signedPolicy(1, nil), Agent: a.att})
	if err != nil {
		t.Fatal(err)
	}
	add(tlog.KindReissue, "reissue-1", ri.Grant)

	rep, err := e.auditHistory(e.second(), "vm1", nil)
	if err != nil {
		t.Fatalf("history: %v", err)
	}
	for _, g := range grants {
		found := false
		for _, st := range statements(rep, g.kind)[g.id] {
			found = found || bytes.Equal(st, tlog.StatementDigest(g.g))
		}
		if !found {
			t.Errorf("the %s grant of %s left the keybroker without its entry", g.kind, g.id)
		}
	}

	// With the log unwritable, nothing leaves: not an adoption, a release, a repeated release
	// or a reissue.
	m2 := e.newMigration("m2", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(ctx, m2.req); err != nil {
		t.Fatal(err)
	}
	m2again := e.newMigration("m2", "vm1", "destination", e.signedPolicy(1, nil))
	a2 := e.attest("destination", "reissue-2", attest.RoleAdopt, keybrokertest.CleanStatement(t))
	a3 := e.attest("source", "adopt-vm2", attest.RoleAdopt, keybrokertest.CleanStatement(t))
	e.jamLog()
	if r, err := e.kb.Release(ctx, m2again.req); err == nil || r != nil {
		t.Errorf("a repeated release went through without its entry: %v", err)
	}
	if r, err := e.kb.Reissue(ctx, &kbwire.ReissueRequest{ReissueID: "reissue-2", Tenant: "demo", VM: "vm1", Policy: e.signedPolicy(1, nil), Agent: a2.att}); err == nil || r != nil {
		t.Errorf("a reissue went through without its entry: %v", err)
	}
	if r, err := e.kb.Adopt(ctx, &kbwire.AdoptRequest{AdoptionID: "adopt-vm2", Tenant: "demo", VM: "vm2", Policy: e.signedPolicy(1, nil), Agent: a3.att}); err == nil || r != nil {
		t.Errorf("an adoption went through without its entry: %v", err)
	}
	if e.transitKeyExists(epochKeyName("demo", "vm2", 1)) {
		t.Error("the epoch key of the adoption that could not be logged was not destroyed")
	}
}

// TestAttackLogDeadAppender (claim 2): a keybroker that dies after writing log/entries/<n>,
// before moving the guest's record and the head, leaves an entry that the next append (by
// another keybroker, for the same guest or another) finishes: the chain stays unbroken and the
// tree whole.
func TestAttackLogDeadAppender(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	e.adopt("vm2")
	for _, other := range []string{"vm1", "vm2"} {
		// The first step of an append of a denial of vm1, as the dead keybroker made it.
		e.kb.rlog.waitIdle() // the adoptions' entries settled
		head := e.headOf()
		var g logGuestRecord
		if _, err := e.kb.recs.get(ctx, logGuestPath("demo", "vm1"), &g); err != nil {
			t.Fatal(err)
		}
		last := g.Last
		dead := &tlog.Entry{Type: tlog.EntryType, Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", Seq: g.Seq + 1, Prev: &last,
			MigrationID: "m-dead-" + other, Op: "release", Time: time.Now().UTC()}
		leaf, err := dead.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.kb.recs.put(ctx, logEntryPath(head.Size), &logEntryRecord{Leaf: leaf}, 0); err != nil {
			t.Fatal(err)
		}
		// Another keybroker appends next.
		if _, err := e.second().logDecision(ctx, &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: other, MigrationID: "m-after-" + other, Op: "release"}, true); err != nil {
			t.Fatalf("appending after a dead appender: %v", err)
		}
		if got := e.headOf().Size; got != head.Size+2 {
			t.Errorf("head %d after the dead entry %d and one more, want %d", got, head.Size, head.Size+2)
		}
	}
	for _, vm := range []string{"vm1", "vm2"} {
		if _, err := e.auditHistory(e.second(), vm, nil); err != nil {
			t.Errorf("%s after dead appenders: %v", vm, err)
		}
	}
	rep, err := e.auditHistory(e.second(), "vm1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := "adopt:adopt-vm1 deny:m-dead-vm1 deny:m-after-vm1 deny:m-dead-vm2"; kinds(rep) != want {
		t.Errorf("vm1's history %q, want %q", kinds(rep), want)
	}
}

// TestAttackLogDenials (claim 4): denials are logged only for guests of registered tenants,
// and any number of them, interleaved with a guest's migrations, leave its history
// verifiable.
func TestAttackLogDenials(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	deny := func(id, tenant, vm string) {
		t.Helper()
		m := e.newMigration(id, "vm1", "destination", e.signedPolicy(1, nil))
		m.req.Tenant, m.req.VM = tenant, vm
		m.req.Source.Nonce = nil // a request the keybroker refuses
		if _, err := e.kb.Release(ctx, m.req); err == nil {
			t.Fatalf("release %s went through", id)
		}
	}
	deny("d0", "demo", "vm1") // before the adoption
	e.adopt("vm1")
	deny("d1", "demo", "vm1")
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	rel, err := e.kb.Release(ctx, m.req)
	if err != nil {
		t.Fatal(err)
	}
	deny("d2", "demo", "vm1") // while m1 is in progress
	deny("m1", "demo", "vm1") // naming the migration in progress
	if _, err := e.kb.Destroy(ctx, e.commit(m, rel)); err != nil {
		t.Fatal(err)
	}
	deny("d3", "demo", "vm1")
	if _, err := e.kb.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort}); err == nil {
		t.Fatal("an abort after the commit went through")
	}
	rep, err := e.auditHistory(e.second(), "vm1", nil)
	if err != nil {
		t.Fatalf("a history with denials interleaved: %v", err)
	}
	if rep.Live != 2 || rep.Denials < 5 {
		t.Errorf("live epoch %d, %d denials; want 2 and at least 5", rep.Live, rep.Denials)
	}

	size := e.headOf().Size
	deny("x1", "nobody", "vm1")    // an unregistered tenant
	deny("x2", "demo/x", "vm1")    // a tenant name with a path in it
	deny("x3", "demo", "../head")  // a guest name with a path in it
	deny("x4", "demo", "vm1/../x") // idem
	if got := e.headOf().Size; got != size {
		t.Errorf("denials for unregistered tenants or malformed names appended %d entries", got-size)
	}
	if ver, err := e.kb.recs.get(ctx, logGuestPath("nobody", "vm1"), &logGuestRecord{}); err != nil || ver != 0 {
		t.Errorf("the unregistered tenant's guest has a log record (version %d, %v)", ver, err)
	}
}

// TestAttackLogRetriedEnding (claim 5): a commit retried from the destruction journal after its
// receipt was stored and its entry appended, and another entry of the guest appended in
// between, names the stored receipt again, never another.
func TestAttackLogRetriedEnding(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	rel, err := e.kb.Release(ctx, m.req)
	if err != nil {
		t.Fatal(err)
	}
	// Vault stops taking the migration ID's end: the receipt is stored, the entry appended,
	// the migration not closed.
	e.proxy.Block(func(r *http.Request) bool {
		return r.Method != http.MethodGet && strings.Contains(r.URL.Path, "/data/migration-ids/m1")
	})
	_, err = e.kb.Destroy(ctx, e.commit(m, rel))
	if !errors.Is(err, ErrDestructionPending) {
		e.proxy.Restore()
		t.Fatalf("Destroy with the migration's end blocked = %v, want ErrDestructionPending", err)
	}
	var stored receiptRecord
	if ver, err := e.kb.recs.get(ctx, receiptPath("m1"), &stored); err != nil || ver == 0 {
		e.proxy.Restore()
		t.Fatalf("the receipt was not stored before the failure (%v): the attack needs it", err)
	}
	// Another decision of the guest in between, so the guest's newest entry is no longer the
	// commit.
	if _, err := e.second().logDecision(ctx, &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", MigrationID: "m-between", Op: "release"}, true); err != nil {
		t.Fatal(err)
	}
	e.proxy.Restore()
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- e.kb.Run(runCtx) }()
	env, err := e.kb.AwaitReceipt(ctx, "m1")
	cancel()
	<-done
	if err != nil {
		t.Fatalf("AwaitReceipt: %v", err)
	}
	if !bytes.Equal(env.Payload, stored.Envelope.Payload) {
		t.Error("the retried commit signed another receipt than the stored one")
	}
	rep, err := e.auditHistory(e.second(), "vm1", nil)
	if err != nil {
		t.Fatalf("history after the retried commit: %v", err)
	}
	for _, st := range statements(rep, tlog.KindCommit)["m1"] {
		if !bytes.Equal(st, tlog.StatementDigest(stored.Envelope.Payload)) {
			t.Error("a commit entry of m1 names a receipt other than the stored one")
		}
	}
	if len(statements(rep, tlog.KindAbort)["m1"]) != 0 {
		t.Error("the retried commit appended an abort")
	}
}

// tamperEnv is a log of two guests with a pinned checkpoint (after vm1's first migration) and
// the checkpoint of vm1's second migration's receipt, the newest one the tenant has seen.
type tamperEnv struct {
	*env
	pinned, seen *tlog.Signed
	savedHead    map[string]any // the head at the pinned size
	savedGuest   map[string]any // vm1's record at the pinned size
}

func newTamperEnv(t *testing.T) *tamperEnv {
	e := newEnv(t)
	e.adopt("vm1") // 0
	e.adopt("vm2") // 1
	e.migrateVM("m1", "vm1")
	te := &tamperEnv{env: e, pinned: e.pin(e.kb), savedHead: e.kvGet(logHeadPath), savedGuest: e.kvGet(logGuestPath("demo", "vm1"))}
	resp := e.migrateVM("m2", "vm1")
	if resp.Log == nil {
		t.Fatal("no log proof with the receipt")
	}
	var err error
	if te.seen, err = tlog.Open(resp.Log.Checkpoint, e.logVerifier(), nil, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.auditHistory(e.second(), "vm1", te.seen); err != nil {
		t.Fatalf("the untouched history: %v", err)
	}
	return te
}

// alter rewrites entry i with edit applied.
func (te *tamperEnv) alter(i uint64, edit func(*tlog.Entry)) {
	te.t.Helper()
	en, err := tlog.ParseEntry(te.leafAt(i))
	if err != nil {
		te.t.Fatal(err)
	}
	edit(en)
	leaf, err := en.Marshal()
	if err != nil {
		te.t.Fatal(err)
	}
	te.kvPut(logEntryPath(i), map[string]any{"leaf": leaf})
}

// deleteCheckpoints removes every stored checkpoint of at least size from, and the pointers.
func (te *tamperEnv) deleteCheckpoints(from uint64) {
	te.t.Helper()
	kv := te.admin.KVv2(vaulttest.KVMount)
	for size := from; size <= te.headOf().Size+2; size++ {
		if err := kv.DeleteMetadata(te.t.Context(), logCheckpointPath(size)); err != nil {
			te.t.Fatal(err)
		}
	}
	for _, p := range []string{logLatestPath, logWitnessedPath} {
		if err := kv.DeleteMetadata(te.t.Context(), p); err != nil {
			te.t.Fatal(err)
		}
	}
}

// TestAttackLogStorageTampering (claim 6): someone with write access to Vault's KV mount, but
// not the signing key, alters, reorders, deletes or rewinds the log; the head is no defence
// (it is unsigned, and recomputed), so each must be caught by a fresh keybroker, by the
// tenant's verification of the history, or by the checkpoint the tenant saw last.
func TestAttackLogStorageTampering(t *testing.T) {
	refused := func(t *testing.T, te *tamperEnv, what string) {
		t.Helper()
		for name, kb := range map[string]*Keybroker{"fresh keybroker": te.second(), "running keybroker": te.kb} {
			if rep, err := te.auditHistory(kb, "vm1", te.seen); err == nil {
				t.Errorf("%s: %s: the history verifies: %q", name, what, kinds(rep))
			}
		}
	}
	t.Run("entry altered, head recomputed", func(t *testing.T) {
		te := newTamperEnv(t)
		te.alter(3, func(en *tlog.Entry) { en.DestroyedKeys = nil }) // the commit of m1
		te.forgeHead(te.headOf().Size)
		refused(t, te, "an altered entry")
	})
	t.Run("entry altered, head recomputed, checkpoints deleted", func(t *testing.T) {
		te := newTamperEnv(t)
		te.alter(2, func(en *tlog.Entry) { en.Host = "host-innocent" }) // the release of m1
		te.forgeHead(te.headOf().Size)
		te.deleteCheckpoints(1)
		refused(t, te, "an altered entry, re-signed")
	})
	t.Run("entries reordered, head recomputed", func(t *testing.T) {
		te := newTamperEnv(t)
		l2, l3 := te.leafAt(2), te.leafAt(3)
		te.kvPut(logEntryPath(2), map[string]any{"leaf": l3})
		te.kvPut(logEntryPath(3), map[string]any{"leaf": l2})
		te.forgeHead(te.headOf().Size)
		refused(t, te, "reordered entries")
	})
	t.Run("entry deleted, later ones moved down", func(t *testing.T) {
		te := newTamperEnv(t)
		size := te.headOf().Size
		for i := uint64(4); i+1 < size; i++ { // drop the release of m2
			te.kvPut(logEntryPath(i), map[string]any{"leaf": te.leafAt(i + 1)})
		}
		if err := te.admin.KVv2(vaulttest.KVMount).DeleteMetadata(t.Context(), logEntryPath(size-1)); err != nil {
			t.Fatal(err)
		}
		te.forgeHead(size - 1)
		te.deleteCheckpoints(1)
		refused(t, te, "a deleted entry")
	})
	t.Run("log truncated to the pinned size", func(t *testing.T) {
		te := newTamperEnv(t)
		size := te.headOf().Size
		for i := te.pinned.Size; i < size; i++ {
			if err := te.admin.KVv2(vaulttest.KVMount).DeleteMetadata(t.Context(), logEntryPath(i)); err != nil {
				t.Fatal(err)
			}
		}
		te.kvPut(logHeadPath, te.savedHead)
		te.kvPut(logGuestPath("demo", "vm1"), te.savedGuest)
		te.deleteCheckpoints(te.pinned.Size + 1)
		refused(t, te, "a truncated log")
	})
	t.Run("head rewound", func(t *testing.T) {
		// The entries past the rewound head are still there: whoever reads the log next
		// finishes them again (as it finishes a dead appender's), so nothing is hidden.
		te := newTamperEnv(t)
		want := te.headOf().Size
		te.kvPut(logHeadPath, te.savedHead)
		for name, kb := range map[string]*Keybroker{"fresh keybroker": te.second(), "running keybroker": te.kb} {
			rep, err := te.auditHistory(kb, "vm1", te.seen)
			if err != nil {
				t.Errorf("%s: the history after the head was rewound: %v", name, err)
				continue
			}
			if got := kinds(rep); !strings.Contains(got, "commit:m2") {
				t.Errorf("%s: the history after the head was rewound hides entries: %q", name, got)
			}
		}
		if got := te.headOf().Size; got != want {
			t.Errorf("head %d after reading the log, want it healed to %d", got, want)
		}
	})
}

// TestAttackLogCosign (claim 7): only configured witnesses' cosignatures of the very
// checkpoint the log signed are stored, each once, and a witness counts once however many
// cosignatures it made.
func TestAttackLogCosign(t *testing.T) {
	_, wkey, _ := ed25519.GenerateKey(rand.Reader)
	w, err := tlog.NewWitnessSigner("witness.example", wkey, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	impostor, err := tlog.NewWitnessSigner("witness.example", other, nil) // w's name, another key
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(c *Config) { c.LogWitnesses = []string{w.VerifierKey()} })
	ctx := t.Context()
	e.adopt("vm1")
	old := e.pin(e.kb)
	e.adopt("vm2")
	cur := e.pin(e.kb)
	wv, err := tlog.ParseWitnessKey(w.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	cosign := func(text string, s note.Signer) []byte {
		t.Helper()
		b, err := note.Sign(&note.Note{Text: text}, s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	stored := func() []byte {
		t.Helper()
		var rec logCheckpointRecord
		if _, err := e.kb.recs.get(ctx, logCheckpointPath(cur.Size), &rec); err != nil {
			t.Fatal(err)
		}
		return rec.Note
	}
	forged := tlog.Checkpoint{Origin: cur.Origin, Size: cur.Size, Root: make([]byte, 32)}
	good := cosign(cur.Text(), w)
	goodSig := good[bytes.LastIndex(good, []byte("\n\n"))+2:]
	oldSig := func() []byte {
		b := cosign(old.Text(), w)
		return b[bytes.LastIndex(b, []byte("\n\n"))+2:]
	}()
	for name, req := range map[string][]byte{
		"an impostor under the witness's name":      cosign(cur.Text(), impostor),
		"the witness, over another root":            cosign(forged.Text(), w),
		"the witness's cosignature of another text": append([]byte(cur.Text()+"\n"), oldSig...),
	} {
		before := stored()
		if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: req}); err == nil {
			t.Errorf("%s: cosign accepted", name)
		}
		if !bytes.Equal(stored(), before) {
			t.Errorf("%s: the stored checkpoint changed", name)
		}
	}
	if _, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{Witnessed: true}); err == nil {
		t.Error("a witnessed checkpoint exists before any genuine cosignature")
	}

	// A genuine cosignature arrives after a line no witness signed: only the cosignature is
	// stored.
	withJunk := append([]byte(cur.Text()+"\n— junk AAAA\n"), goodSig...)
	if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: withJunk}); err != nil {
		t.Fatalf("a genuine cosignature: %v", err)
	}
	once := stored()
	if bytes.Contains(once, []byte("junk")) {
		t.Error("a signature line no configured witness made was stored")
	}
	if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: good}); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("a replayed cosignature = %v, want ErrInvalidRequest", err)
	}
	if !bytes.Equal(stored(), once) {
		t.Error("a replayed cosignature was stored again")
	}
	// The old checkpoint's cosignature, replayed for it, does not move the witnessed
	// checkpoint back.
	if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: append([]byte(old.Text()+"\n"), oldSig...)}); err != nil {
		t.Fatalf("cosigning the older checkpoint: %v", err)
	}
	got, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{Witnessed: true})
	if err != nil {
		t.Fatal(err)
	}
	wcp, err := tlog.Open(got.Checkpoint, e.logVerifier(), []*tlog.WitnessVerifier{wv}, 1)
	if err != nil {
		t.Fatal(err)
	}
	if wcp.Size != cur.Size {
		t.Errorf("the witnessed checkpoint went back to size %d from %d", wcp.Size, cur.Size)
	}
	// A second cosignature by the same witness (another time) counts once.
	later, err := tlog.NewWitnessSigner("witness.example", wkey, func() time.Time { return time.Now().Add(time.Hour) })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: cosign(cur.Text(), later)}); err != nil {
		t.Logf("a second cosignature by the same witness: %v", err)
	}
	if _, err := tlog.Open(stored(), e.logVerifier(), []*tlog.WitnessVerifier{wv}, 2); !errors.Is(err, tlog.ErrTooFewWitnesses) {
		t.Errorf("one witness cosigning twice, two required = %v, want ErrTooFewWitnesses", err)
	}
}
