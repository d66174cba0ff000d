package keybroker

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// logVerifier returns the note verifier of e's log, as a tenant builds it from the keybroker's
// public key and the log's origin.
func (e *env) logVerifier() note.Verifier {
	e.t.Helper()
	pub, err := e.kb.PublicKey(e.t.Context())
	if err != nil {
		e.t.Fatal(err)
	}
	v, err := tlog.LogVerifier(e.kb.LogOrigin(), pub)
	if err != nil {
		e.t.Fatal(err)
	}
	return v
}

// jamLog makes the residency log refuse every append until the test ends: the next index is
// taken by a leaf that is no entry (as whoever can write to the KV mount can do).
func (e *env) jamLog() {
	e.t.Helper()
	e.kb.rlog.waitIdle()
	var head logHeadRecord
	if _, err := e.kb.recs.get(e.t.Context(), logHeadPath, &head); err != nil {
		e.t.Fatal(err)
	}
	e.kvPut(logEntryPath(head.Size), map[string]any{"leaf": []byte("not an entry")})
	e.t.Cleanup(func() {
		if err := e.admin.KVv2(vaulttest.KVMount).DeleteMetadata(context.Background(), logEntryPath(head.Size)); err != nil {
			e.t.Error(err)
		}
	})
}

// kvPut writes a record straight into Vault, as someone with write access to the KV mount
// (not the keybroker) can.
func (e *env) kvPut(path string, data map[string]any) {
	e.t.Helper()
	if _, err := e.admin.KVv2(vaulttest.KVMount).Put(e.t.Context(), path, data); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) kvGet(path string) map[string]any {
	e.t.Helper()
	s, err := e.admin.KVv2(vaulttest.KVMount).Get(e.t.Context(), path)
	if err != nil {
		e.t.Fatal(err)
	}
	return s.Data
}

// TestResidencyLogHistory: a guest adopted, then migrated three times (one aborted), with a
// denial in between, has a history that verifies offline from the checkpoint and the
// keybroker's key alone, every epoch accounted for; each receipt comes with the proof that
// its ending is in the log; and the checkpoint a tenant pinned before is extended, not
// rewritten.
func TestResidencyLogHistory(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	e.adopt("other") // another guest's entries interleave with vm1's

	pinned, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{})
	if err != nil {
		t.Fatal(err)
	}
	pinnedCP, err := tlog.Open(pinned.Checkpoint, e.logVerifier(), nil, 0)
	if err != nil {
		t.Fatalf("opening the pinned checkpoint: %v", err)
	}

	migrate := func(id string, commit bool) *kbwire.DestroyResponse {
		t.Helper()
		m := e.newMigration(id, "vm1", "destination", e.signedPolicy(1, nil))
		rel, err := e.kb.Release(ctx, m.req)
		if err != nil {
			t.Fatalf("releasing %s: %v", id, err)
		}
		req := e.abort(id, "vm1")
		if commit {
			req = e.commit(m, rel)
		}
		resp, err := e.kb.Destroy(ctx, req)
		if err != nil {
			t.Fatalf("ending %s: %v", id, err)
		}
		return resp
	}
	receipts := []*kbwire.DestroyResponse{migrate("m1", true), migrate("m2", false)}
	// A denial: a destination the policy refuses.
	denied := e.newMigration("m-denied", "vm1", "destination", e.signedPolicy(1, func(y string) string {
		return strings.Replace(y, "emulated-sev-snp", "sev-snp", -1)
	}))
	if _, err := e.kb.Release(ctx, denied.req); err == nil {
		t.Fatal("a release the policy denies went through")
	}
	receipts = append(receipts, migrate("m3", true))

	rep, err := e.auditHistory(e.kb, "vm1", nil)
	if err != nil {
		t.Fatalf("verifying vm1's history: %v", err)
	}
	var kinds []string
	for _, en := range rep.Entries {
		kinds = append(kinds, string(en.Kind)+":"+en.MigrationID)
	}
	want := "adopt:adopt-vm1 release:m1 commit:m1 release:m2 abort:m2 deny:m-denied release:m3 commit:m3"
	if got := strings.Join(kinds, " "); got != want {
		t.Errorf("vm1's entries:\n got %s\nwant %s", got, want)
	}
	if rep.Live != 3 || len(rep.Residencies) != 3 || rep.Denials != 1 || len(rep.InProgress) != 0 {
		t.Errorf("report: live %d, %d residencies, %d denials, in progress %v; want 3, 3, 1, none", rep.Live, len(rep.Residencies), rep.Denials, rep.InProgress)
	}
	for _, r := range rep.Residencies[:2] {
		if r.Ended == "" {
			t.Errorf("epoch %d has not ended", r.Epoch)
		}
	}

	// Every receipt's ending is in the log and names that receipt.
	for _, resp := range receipts {
		if resp.Log == nil {
			t.Fatal("a receipt came without its log proof")
		}
		cp, err := tlog.Open(resp.Log.Checkpoint, e.logVerifier(), nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		r := e.verifyReceipt(resp.Receipt)
		if _, err := tlog.VerifyReceipt(cp, resp.Log, r.MigrationID, resp.Receipt.Payload); err != nil {
			t.Errorf("receipt of %s: %v", r.MigrationID, err)
		}
		if _, err := tlog.VerifyReceipt(cp, resp.Log, "m-other", resp.Receipt.Payload); err == nil {
			t.Errorf("the log proof of %s passes for another migration", r.MigrationID)
		}
	}

	// The pinned checkpoint is a prefix of today's.
	now, err := tlog.Open(func() []byte {
		r, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Checkpoint
	}(), e.logVerifier(), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	proof, err := e.kb.LogConsistency(ctx, &kbwire.LogConsistencyRequest{From: pinnedCP.Size, To: now.Size})
	if err != nil {
		t.Fatal(err)
	}
	if err := tlog.CheckExtends(pinnedCP.Checkpoint, now.Checkpoint, proof.Proof); err != nil {
		t.Errorf("today's checkpoint does not extend the pinned one: %v", err)
	}

	// A second keybroker on the same Vault (a fresh process) tells the same history.
	rep2, err := e.auditHistory(e.second(), "vm1", nil)
	if err != nil || len(rep2.Entries) != len(rep.Entries) {
		t.Errorf("the second keybroker's history: %d entries, %v", len(rep2.Entries), err)
	}
}

// TestResidencyLogTampering: whoever can write to Vault's KV mount but does not hold the
// keybroker's key cannot make a history that verifies after deleting, altering or
// reordering entries, and a keybroker that rewrites the log is caught by the tenant's pinned
// checkpoint.
func TestResidencyLogTampering(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	for _, id := range []string{"m1", "m2"} {
		m := e.newMigration(id, "vm1", "destination", e.signedPolicy(1, nil))
		rel, err := e.kb.Release(ctx, m.req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.kb.Destroy(ctx, e.commit(m, rel)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.auditHistory(e.kb, "vm1", nil); err != nil {
		t.Fatalf("the untouched history: %v", err)
	}
	pinned, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{})
	if err != nil {
		t.Fatal(err)
	}
	pinnedCP, err := tlog.Open(pinned.Checkpoint, e.logVerifier(), nil, 0)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("entry altered", func(t *testing.T) {
		// Entry 2 (vm1's commit of m1) rewritten to destroy nothing: the keybroker refuses to
		// serve a log whose entries no longer hash to its head.
		old := e.kvGet(logEntryPath(2))
		defer e.kvPut(logEntryPath(2), old)
		var en tlog.Entry
		rec := logEntryRecord{}
		if _, err := e.kb.recs.get(ctx, logEntryPath(2), &rec); err != nil {
			t.Fatal(err)
		}
		parsed, err := tlog.ParseEntry(rec.Leaf)
		if err != nil {
			t.Fatal(err)
		}
		en = *parsed
		en.DestroyedKeys = nil
		leaf, _ := en.Marshal()
		e.kvPut(logEntryPath(2), map[string]any{"leaf": leaf})
		fresh := e.second() // no tree in memory yet
		if _, err := e.auditHistory(fresh, "vm1", nil); !errors.Is(err, ErrLogCorrupted) && !errors.Is(err, tlog.ErrIncomplete) {
			t.Errorf("history after altering an entry = %v, want ErrLogCorrupted or ErrIncomplete", err)
		}
	})

	t.Run("entry deleted", func(t *testing.T) {
		old := e.kvGet(logEntryPath(3))
		defer e.kvPut(logEntryPath(3), old)
		if err := e.admin.KVv2(vaulttest.KVMount).DeleteMetadata(ctx, logEntryPath(3)); err != nil {
			t.Fatal(err)
		}
		if _, err := e.auditHistory(e.second(), "vm1", nil); !errors.Is(err, ErrLogCorrupted) {
			t.Errorf("history after deleting an entry = %v, want ErrLogCorrupted", err)
		}
	})

	t.Run("log rewritten and re-signed", func(t *testing.T) {
		// The keybroker itself (it holds the key) forks the log: a head over other entries,
		// signed. The new checkpoint verifies alone, but not as an extension of the pinned one.
		forked := e.second()
		var head logHeadRecord
		if _, err := forked.recs.get(ctx, logHeadPath, &head); err != nil {
			t.Fatal(err)
		}
		var tr tlog.Tree
		for i := range head.Size + 2 {
			tr.Append(tlog.LeafHash(fmt.Appendf(nil, "forged %d", i)))
		}
		root, _ := tr.Root(tr.Size())
		pub, _ := forked.PublicKey(ctx)
		signed, err := tlog.Sign(tlog.Checkpoint{Origin: forked.LogOrigin(), Size: tr.Size(), Root: root}, pub, func(msg []byte) ([]byte, error) {
			return forked.keys.sign(ctx, ReceiptSigningKey, msg)
		})
		if err != nil {
			t.Fatal(err)
		}
		cp, err := tlog.Open(signed, e.logVerifier(), nil, 0)
		if err != nil {
			t.Fatalf("the forged checkpoint does not even verify alone: %v", err)
		}
		proof, _ := tr.ConsistencyProof(pinnedCP.Size, tr.Size())
		if err := tlog.CheckExtends(pinnedCP.Checkpoint, cp.Checkpoint, proof); !errors.Is(err, tlog.ErrInconsistent) {
			t.Errorf("a rewritten log against the pinned checkpoint = %v, want ErrInconsistent", err)
		}
	})

	if _, err := e.auditHistory(e.second(), "vm1", nil); err != nil {
		t.Errorf("the history once storage is restored: %v", err)
	}
}

// TestResidencyLogConcurrentKeybrokers: two keybrokers appending at once, to the same guests,
// make one tree: every index once, every guest's chain unbroken, the head's root the root of
// the entries.
func TestResidencyLogConcurrentKeybrokers(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	kbs := []*Keybroker{e.kb, e.second()}
	const guests, perGuest = 4, 12
	var wg sync.WaitGroup
	errs := make(chan error, guests*perGuest)
	for g := range guests {
		for i := range perGuest {
			kb := kbs[(g+i)%2]
			wg.Go(func() {
				_, err := kb.logDecision(ctx, &tlog.Entry{
					Kind: tlog.KindDeny, Tenant: "demo", VM: fmt.Sprintf("vm%d", g), MigrationID: fmt.Sprintf("m%d-%d", g, i), Op: "release",
				}, (g+i)%3 == 0)
				errs <- err
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("appending: %v", err)
		}
	}
	for g := range guests {
		rep, err := e.auditHistory(kbs[g%2], fmt.Sprintf("vm%d", g), nil)
		if err != nil {
			t.Fatalf("vm%d: %v", g, err)
		}
		if rep.Denials != perGuest {
			t.Errorf("vm%d: %d entries, want %d", g, rep.Denials, perGuest)
		}
	}
	for _, kb := range kbs {
		head, err := kb.rlog.syncTree(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		if head.Size != guests*perGuest {
			t.Errorf("log size %d, want %d", head.Size, guests*perGuest)
		}
	}
}

// TestResidencyLogWitness: a configured witness's cosignature is stored with the checkpoint
// and a tenant can require it; an unknown witness's is refused.
func TestResidencyLogWitness(t *testing.T) {
	_, wkey, _ := ed25519.GenerateKey(rand.Reader)
	w, err := tlog.NewWitnessSigner("witness.example", wkey, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	stranger, _ := tlog.NewWitnessSigner("stranger.example", other, nil)
	e := newEnv(t, func(c *Config) { c.LogWitnesses = []string{w.VerifierKey()} })
	ctx := t.Context()
	e.adopt("vm1")

	if _, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{Witnessed: true}); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("a witnessed checkpoint before any witness = %v, want ErrInvalidRequest", err)
	}
	cp, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{})
	if err != nil {
		t.Fatal(err)
	}
	opened, err := tlog.Open(cp.Checkpoint, e.logVerifier(), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	cosign := func(s note.Signer) []byte {
		b, err := note.Sign(&note.Note{Text: opened.Text()}, s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: cosign(stranger)}); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("an unknown witness's cosignature = %v, want ErrInvalidRequest", err)
	}
	if _, err := e.kb.LogCosign(ctx, &kbwire.LogCosignRequest{Checkpoint: cosign(w)}); err != nil {
		t.Fatalf("cosigning: %v", err)
	}
	wv, err := tlog.ParseWitnessKey(w.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	got, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{Witnessed: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tlog.Open(got.Checkpoint, e.logVerifier(), []*tlog.WitnessVerifier{wv}, 1); err != nil {
		t.Errorf("the witnessed checkpoint with one required cosignature: %v", err)
	}
	h, err := e.kb.LogHistory(ctx, &kbwire.LogHistoryRequest{Tenant: "demo", VM: "vm1", Witnessed: true})
	if err != nil {
		t.Fatal(err)
	}
	wcp, err := tlog.Open(h.Checkpoint, e.logVerifier(), []*tlog.WitnessVerifier{wv}, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tlog.VerifyHistory(wcp, h); err != nil {
		t.Errorf("the history against the witnessed checkpoint: %v", err)
	}
}

// TestResidencyLogReleaseNeedsItsEntry: a release whose entry cannot be appended (Vault stops
// taking the log's writes) releases nothing: its keys are destroyed as for any failure.
func TestResidencyLogReleaseNeedsItsEntry(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	e.jamLog()
	if _, err := e.kb.Release(ctx, m.req); err == nil {
		t.Fatal("a release went through without its log entry")
	}
	for _, k := range e.transitKeys() {
		if k == migrationKeyName("m1") || k == epochKeyName("demo", "vm1", 2) {
			t.Errorf("key %s of the failed release still exists", k)
		}
	}
}

// TestResidencyLogAppendAfterDeadline: an append whose deadline passed before a batch took it
// is never written (a reissue's hold on its guest counts on it), and the next one is.
func TestResidencyLogAppendAfterDeadline(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	e.kb.rlog.waitIdle()
	before := e.headOf().Size
	late, cancel := context.WithDeadline(t.Context(), time.Now().Add(-time.Millisecond))
	defer cancel()
	if _, err := e.kb.logDecision(late, &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", MigrationID: "m-late", Op: "release"}, false); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("append past its deadline: %v, want context.DeadlineExceeded", err)
	}
	e.kb.rlog.waitIdle()
	if got := e.headOf().Size; got != before {
		t.Fatalf("the log grew from %d to %d entries by an append past its deadline", before, got)
	}
	if _, err := e.kb.logDecision(t.Context(), &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", MigrationID: "m-next", Op: "release"}, true); err != nil {
		t.Fatalf("the next append: %v", err)
	}
	rep, err := e.auditHistory(e.kb, "vm1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := kinds(rep), "adopt:adopt-vm1 deny:m-next"; got != want {
		t.Errorf("vm1's history %s, want %s", got, want)
	}
}

// TestResidencyLogHistoryPages: a history longer than one NATS answer comes in pages proven
// against one checkpoint; the client puts them together and the whole verifies, while a
// single page alone does not pass for the whole.
func TestResidencyLogHistoryPages(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	const denials = 2*maxHistoryPage + 50
	var wg sync.WaitGroup
	for i := range denials {
		wg.Go(func() {
			if _, err := e.kb.logDecision(ctx, &tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "vm1", MigrationID: fmt.Sprintf("m-%d", i), Op: "release"}, true); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	first, err := e.kb.LogHistory(ctx, &kbwire.LogHistoryRequest{Tenant: "demo", VM: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Entries) != maxHistoryPage || first.Next != maxHistoryPage+1 {
		t.Fatalf("first page: %d entries, next %d; want %d, %d", len(first.Entries), first.Next, maxHistoryPage, maxHistoryPage+1)
	}
	cp, err := tlog.Open(first.Checkpoint, e.logVerifier(), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tlog.VerifyHistory(cp, first); !errors.Is(err, tlog.ErrIncomplete) {
		t.Errorf("one page verified as a whole history: %v", err)
	}
	whole := *first
	for whole.Next != 0 {
		page, err := e.kb.LogHistory(ctx, &kbwire.LogHistoryRequest{Tenant: "demo", VM: "vm1", Size: cp.Size, FromSeq: whole.Next})
		if err != nil {
			t.Fatal(err)
		}
		whole.Entries, whole.Next = append(whole.Entries, page.Entries...), page.Next
	}
	rep, err := tlog.VerifyHistory(cp, &whole)
	if err != nil {
		t.Fatalf("the pages together: %v", err)
	}
	if rep.Denials != denials || rep.Live != 1 {
		t.Errorf("the pages together: %d denials, live epoch %d; want %d, 1", rep.Denials, rep.Live, denials)
	}
}

// TestResidencyLogRefusesToSignARewrite: whoever rewrites an entry already under a signed
// checkpoint and recomputes the head (all a KV writer can do without the signing key) cannot
// get the rewrite signed: a fresh keybroker finds that the tree no longer has the signed
// checkpoint's root.
func TestResidencyLogRefusesToSignARewrite(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	e.adopt("vm2")
	if _, err := e.kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{}); err != nil {
		t.Fatal(err)
	}
	var rec logEntryRecord
	if _, err := e.kb.recs.get(ctx, logEntryPath(0), &rec); err != nil {
		t.Fatal(err)
	}
	en, err := tlog.ParseEntry(rec.Leaf)
	if err != nil {
		t.Fatal(err)
	}
	en.Host = "host-innocent"
	leaf, _ := en.Marshal()
	e.kvPut(logEntryPath(0), map[string]any{"leaf": leaf})
	// The head recomputed over the stored leaves, as the attacker can.
	var head logHeadRecord
	if _, err := e.kb.recs.get(ctx, logHeadPath, &head); err != nil {
		t.Fatal(err)
	}
	r := rangeFactory.NewEmptyRange(0)
	for i := range head.Size {
		var lr logEntryRecord
		if _, err := e.kb.recs.get(ctx, logEntryPath(i), &lr); err != nil {
			t.Fatal(err)
		}
		if err := r.Append(tlog.LeafHash(lr.Leaf), nil); err != nil {
			t.Fatal(err)
		}
	}
	e.kvPut(logHeadPath, map[string]any{"size": head.Size, "range": r.Hashes()})
	e.adopt("vm3") // the log grows: the next checkpoint would cover the rewrite
	for name, kb := range map[string]*Keybroker{"fresh keybroker": e.second(), "running keybroker": e.kb} {
		if _, err := kb.LogCheckpoint(ctx, &kbwire.LogCheckpointRequest{}); !errors.Is(err, ErrLogCorrupted) {
			t.Errorf("%s: signing a checkpoint over a rewritten entry = %v, want ErrLogCorrupted", name, err)
		}
	}
}

// TestResidencyLogConcurrentReceipts: destructions of many guests at once (which catch the
// tree up together and share the checkpoints they sign) each come with a proof that their
// ending is in the log, naming their receipt, in a checkpoint the keybroker signed.
func TestResidencyLogConcurrentReceipts(t *testing.T) {
	e := newEnv(t)
	const guests = 12
	for g := range guests {
		e.adopt(fmt.Sprintf("vm%d", g))
	}
	resps := make([]*kbwire.DestroyResponse, guests)
	errs := make([]error, guests)
	var wg sync.WaitGroup
	for g := range guests {
		wg.Go(func() {
			resps[g], errs[g] = e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{
				MigrationID: fmt.Sprintf("m%d", g), Tenant: "demo", VM: fmt.Sprintf("vm%d", g), Ending: kbwire.Abort,
			})
		})
	}
	wg.Wait()
	v := e.logVerifier()
	for g, resp := range resps {
		if errs[g] != nil {
			t.Fatalf("destroying m%d: %v", g, errs[g])
		}
		if resp.Log == nil {
			t.Fatalf("the receipt of m%d came without its log proof", g)
		}
		cp, err := tlog.Open(resp.Log.Checkpoint, v, nil, 0)
		if err != nil {
			t.Fatalf("m%d: %v", g, err)
		}
		if _, err := tlog.VerifyReceipt(cp, resp.Log, fmt.Sprintf("m%d", g), resp.Receipt.Payload); err != nil {
			t.Errorf("receipt of m%d: %v", g, err)
		}
	}
}
