package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// testLog is a residency log kept in the test: a tlog.Tree of entries whose checkpoints are
// signed with a test key. It answers as the keybroker does (logSource).
type testLog struct {
	t       *testing.T
	origin  string
	key     ed25519.PrivateKey
	tree    tlog.Tree
	leaves  [][]byte
	last    map[string]*tlog.Link
	seq     map[string]uint64
	cosigns [][]byte
	// witnesses are those whose cosignatures LogCosign keeps.
	witnesses []*tlog.WitnessVerifier
}

func newTestLog(t *testing.T) *testLog {
	_, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &testLog{t: t, origin: "kb.test/lethe", key: key, last: map[string]*tlog.Link{}, seq: map[string]uint64{}}
}

// add appends an entry of tenant/vm, chaining it to the guest's previous one.
func (l *testLog) add(e tlog.Entry) {
	l.t.Helper()
	g := e.Tenant + "/" + e.VM
	l.seq[g]++
	e.Type, e.Seq, e.Prev = tlog.EntryType, l.seq[g], l.last[g]
	e.Time = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	leaf, err := e.Marshal()
	if err != nil {
		l.t.Fatal(err)
	}
	idx := uint64(len(l.leaves))
	l.leaves = append(l.leaves, leaf)
	l.tree.Append(tlog.LeafHash(leaf))
	l.last[g] = &tlog.Link{Index: idx, Hash: tlog.LeafHash(leaf)}
}

// migrate adds the entries of a guest's adoption on h1 and its migration m1 to h2.
func (l *testLog) migrate(tenant, vm string) {
	l.add(tlog.Entry{Kind: tlog.KindAdopt, Tenant: tenant, VM: vm, MigrationID: "adopt-1", FromEpoch: 0, ToEpoch: 1, Host: "h1"})
	l.add(tlog.Entry{Kind: tlog.KindRelease, Tenant: tenant, VM: vm, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Host: "h2"})
	l.add(tlog.Entry{Kind: tlog.KindDeny, Tenant: tenant, VM: vm, MigrationID: "m2", Op: "release", Reasons: []string{"tcb too old"}})
	l.add(tlog.Entry{
		Kind: tlog.KindCommit, Tenant: tenant, VM: vm, MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Outcome: "erased",
		DestroyedKeys: []string{tlog.MigrationKey("m1"), tlog.EpochKey(tenant, vm, 1)},
	})
}

// checkpoint signs the checkpoint of the log's current size.
func (l *testLog) checkpoint() []byte {
	l.t.Helper()
	root, err := l.tree.Root(l.tree.Size())
	if err != nil {
		l.t.Fatal(err)
	}
	signed, err := tlog.Sign(tlog.Checkpoint{Origin: l.origin, Size: l.tree.Size(), Root: root}, l.key.Public().(ed25519.PublicKey),
		func(m []byte) ([]byte, error) { return ed25519.Sign(l.key, m), nil })
	if err != nil {
		l.t.Fatal(err)
	}
	return signed
}

// writePub writes the log's public key, PEM, and returns its file.
func (l *testLog) writePub(dir string) string {
	l.t.Helper()
	pem, err := receipt.MarshalPublicKeyPEM(l.key.Public().(ed25519.PublicKey))
	if err != nil {
		l.t.Fatal(err)
	}
	path := filepath.Join(dir, "keybroker.pub")
	if err := os.WriteFile(path, pem, 0o644); err != nil {
		l.t.Fatal(err)
	}
	return path
}

func (l *testLog) LogCheckpoint(context.Context, bool) ([]byte, error) { return l.checkpoint(), nil }

func (l *testLog) LogConsistency(_ context.Context, from, to uint64) ([][]byte, error) {
	return l.tree.ConsistencyProof(from, to)
}

func (l *testLog) LogHistory(_ context.Context, tenant, vm string, _ bool) (*tlog.History, error) {
	h := &tlog.History{Tenant: tenant, VM: vm, Checkpoint: l.checkpoint()}
	for i, leaf := range l.leaves {
		e, err := tlog.ParseEntry(leaf)
		if err != nil || e.Tenant != tenant || e.VM != vm {
			continue
		}
		p, err := l.tree.InclusionProof(uint64(i), l.tree.Size())
		if err != nil {
			return nil, err
		}
		h.Entries = append(h.Entries, tlog.ProvenEntry{Index: uint64(i), Leaf: leaf, Proof: p})
	}
	return h, nil
}

func (l *testLog) LogCosign(_ context.Context, cosigned []byte) ([]byte, error) {
	merged, err := tlog.AddCosignatures(l.checkpoint(), cosigned, l.witnesses)
	if err != nil {
		return nil, err
	}
	l.cosigns = append(l.cosigns, merged)
	return merged, nil
}

// forkedLog returns a log with the same key and origin as l whose entries differ from l's
// from the first: a keybroker's other view.
func forkedLog(t *testing.T, l *testLog) *testLog {
	f := &testLog{t: t, origin: l.origin, key: l.key, last: map[string]*tlog.Link{}, seq: map[string]uint64{}}
	f.add(tlog.Entry{Kind: tlog.KindAdopt, Tenant: "other", VM: "db", MigrationID: "adopt-x", ToEpoch: 1, Host: "h9"})
	return f
}

func trustOf(t *testing.T, l *testLog) *verifier {
	t.Helper()
	v, err := (&logTrust{pubFile: l.writePub(t.TempDir())}).load()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestHistoryVerifies(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "web")
	l.migrate("acme", "db")
	pinned := filepath.Join(t.TempDir(), "pinned")
	old := l.checkpoint()
	if err := os.WriteFile(pinned, old, 0o644); err != nil {
		t.Fatal(err)
	}
	l.add(tlog.Entry{Kind: tlog.KindReissue, Tenant: "acme", VM: "web", MigrationID: "r1", FromEpoch: 2, ToEpoch: 2, Host: "h2"})

	res, err := checkHistory(t.Context(), l, historyCheck{tenant: "acme", vm: "web", trust: trustOf(t, l), pinned: pinned, updatePinned: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Failure != nil {
		t.Fatalf("Failure = %v", res.Failure)
	}
	want := []tlog.Residency{{Epoch: 1, Hosts: []string{"h1"}, Began: "adopt-1", Ended: "m1"}, {Epoch: 2, Hosts: []string{"h2", "h2"}, Began: "m1"}}
	if diff := cmp.Diff(want, res.Report.Residencies); diff != "" {
		t.Errorf("residencies (-want +got):\n%s", diff)
	}
	if res.Report.Live != 2 || res.Report.Denials != 1 || !res.PinMoved {
		t.Errorf("live %d, denials %d, pin moved %v; want 2, 1, true", res.Report.Live, res.Report.Denials, res.PinMoved)
	}
	if b, _ := os.ReadFile(pinned); !bytes.Equal(b, l.checkpoint()) {
		t.Errorf("the pinned file holds %q, want the newer checkpoint", b)
	}
	var out bytes.Buffer
	res.print(&out, true)
	for _, s := range []string{"VERIFIED: 5 entries of acme/web", "live epoch  2", "epoch 1     on h1 (began with adopt-1), ended by m1", "denied release: tcb too old"} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("output lacks %q:\n%s", s, out.String())
		}
	}
}

// TestHistoryBundle saves a history with its consistency proof and verifies it offline through
// the command; a bundle whose entry was altered, or whose entry was removed, fails naming why.
func TestHistoryBundle(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "web")
	dir := t.TempDir()
	pub := l.writePub(dir)
	pinned := filepath.Join(dir, "pinned")
	if err := os.WriteFile(pinned, l.checkpoint(), 0o644); err != nil {
		t.Fatal(err)
	}
	l.migrate("acme", "db")
	rec := &recordingSource{logSource: l}
	res, err := checkHistory(t.Context(), rec, historyCheck{tenant: "acme", vm: "web", trust: trustOf(t, l), pinned: pinned})
	if err != nil || res.Failure != nil {
		t.Fatalf("checkHistory: %v, %v", err, res.Failure)
	}
	if rec.proof == nil || rec.proof.From != 4 || rec.proof.To != 8 {
		t.Fatalf("recorded proof %+v, want one from 4 to 8", rec.proof)
	}
	write := func(name string, b historyBundle) string {
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	good := historyBundle{History: res.History, Consistency: rec.proof}
	t.Setenv("LETHE_TENANT", "")
	t.Setenv("LETHECTL_CONFIG", "")
	t.Setenv("LETHE_CONFIG", "")
	t.Setenv("XDG_CONFIG_HOME", dir)
	args := func(bundle string) []string {
		return []string{"guests", "history", "web", "--pub", pub, "--pinned", pinned, "--from-bundle", bundle}
	}
	out, errOut, code := runLethectl(t, args(write("good", good))...)
	if code != 0 || !strings.Contains(out, "VERIFIED: 4 entries of acme/web") {
		t.Fatalf("good bundle: exit %d\n%s%s", code, out, errOut)
	}

	tampered := cloneBundle(t, good)
	e, _ := tlog.ParseEntry(tampered.History.Entries[0].Leaf)
	e.Host = "evil-host"
	tampered.History.Entries[0].Leaf, _ = e.Marshal()
	pin, err := os.ReadFile(pinned)
	if err != nil {
		t.Fatal(err)
	}
	out, _, code = runLethectl(t, append(args(write("tampered", tampered)), "--update-pinned")...)
	if code != 1 || !strings.Contains(out, "INVALID: ") || !strings.Contains(out, "entry 0 (seq 1): not in the log of checkpoint 8") {
		t.Errorf("altered entry: exit %d, want 1 naming the entry not in the log:\n%s", code, out)
	}
	if after, _ := os.ReadFile(pinned); !bytes.Equal(after, pin) {
		t.Error("--update-pinned moved the pin although the history did not verify")
	}

	removed := cloneBundle(t, good)
	removed.History.Entries = append(removed.History.Entries[:1], removed.History.Entries[2:]...)
	out, _, code = runLethectl(t, args(write("removed", removed))...)
	if code != 1 || !strings.Contains(out, "an entry of the guest is missing") {
		t.Errorf("removed entry: exit %d, want 1 naming the missing entry:\n%s", code, out)
	}

	noProof := cloneBundle(t, good)
	noProof.Consistency = nil
	_, errOut, code = runLethectl(t, args(write("noproof", noProof))...)
	if code != 1 || !strings.Contains(errOut, "no consistency proof from size 4 to 8") {
		t.Errorf("bundle without its proof: exit %d, %q; want an error naming the missing proof", code, errOut)
	}
}

func cloneBundle(t *testing.T, b historyBundle) historyBundle {
	t.Helper()
	data, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	var c historyBundle
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestHistoryForkedFromPin checks that a history whose checkpoint does not extend the pinned
// one fails as a split view, and that --update-pinned then leaves the pin where it was.
func TestHistoryForkedFromPin(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "web")
	pinned := filepath.Join(t.TempDir(), "pinned")
	pin := l.checkpoint()
	if err := os.WriteFile(pinned, pin, 0o644); err != nil {
		t.Fatal(err)
	}
	f := forkedLog(t, l)
	f.migrate("acme", "web")
	f.migrate("acme", "db")
	for name, src := range map[string]*testLog{"larger fork": f, "same size, other root": sameSizeFork(t, l)} {
		t.Run(name, func(t *testing.T) {
			res, err := checkHistory(t.Context(), src, historyCheck{tenant: "acme", vm: "web", trust: trustOf(t, l), pinned: pinned, updatePinned: true})
			if err != nil {
				t.Fatal(err)
			}
			if !errors.Is(res.Failure, tlog.ErrInconsistent) || !strings.Contains(res.Failure.Error(), "split view") {
				t.Errorf("Failure = %v, want an inconsistency naming a split view", res.Failure)
			}
			if res.PinMoved {
				t.Error("the pin moved")
			}
			if b, _ := os.ReadFile(pinned); !bytes.Equal(b, pin) {
				t.Errorf("the pinned file changed to %q", b)
			}
		})
	}
}

// sameSizeFork returns a log of l's size with another guest's entries.
func sameSizeFork(t *testing.T, l *testLog) *testLog {
	f := &testLog{t: t, origin: l.origin, key: l.key, last: map[string]*tlog.Link{}, seq: map[string]uint64{}}
	f.migrate("acme", "web")
	f.leaves[3] = bytes.Replace(f.leaves[3], []byte(`"erased"`), []byte(`"aborted"`), 1)
	f.tree = tlog.Tree{}
	for _, leaf := range f.leaves {
		f.tree.Append(tlog.LeafHash(leaf))
	}
	return f
}

func TestHistoryRefusesAnotherGuestsAnswer(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "db")
	src := &renamingSource{testLog: l}
	res, err := checkHistory(t.Context(), src, historyCheck{tenant: "acme", vm: "web", trust: trustOf(t, l)})
	if err != nil {
		t.Fatal(err)
	}
	if res.Failure == nil || !strings.Contains(res.Failure.Error(), "the history is of acme/db, not acme/web") {
		t.Errorf("Failure = %v, want one naming the other guest", res.Failure)
	}
}

// renamingSource answers every history request with acme/db's.
type renamingSource struct{ *testLog }

func (s *renamingSource) LogHistory(ctx context.Context, tenant, _ string, w bool) (*tlog.History, error) {
	return s.testLog.LogHistory(ctx, tenant, "db", w)
}

func TestWitnessKeygenRoundTrip(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "witness.key")
	out, errOut, code := runLethectl(t, "log", "witness", "keygen", "--name", "w.example", "--out", key, "-o", "json")
	if code != 0 {
		t.Fatalf("keygen: exit %d\n%s%s", code, out, errOut)
	}
	var res struct{ Name, VerifierKey string }
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, mode %v; want 0600", err, fi.Mode())
	}
	w, err := readWitnessKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if w.Name() != "w.example" || w.VerifierKey() != res.VerifierKey {
		t.Errorf("read back %s %s, want w.example %s", w.Name(), w.VerifierKey(), res.VerifierKey)
	}
	if _, err := tlog.ParseWitnessKey(res.VerifierKey); err != nil {
		t.Errorf("the printed verifier key does not decode: %v", err)
	}
	if _, _, code := runLethectl(t, "log", "witness", "keygen", "--name", "w.example", "--out", key); code == 0 {
		t.Error("keygen over an existing key file succeeded")
	}
}

func newTestWitness(t *testing.T, l *testLog, state string) (*witness, *tlog.WitnessVerifier, *bytes.Buffer) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := tlog.NewWitnessSigner("w.example", priv, nil)
	if err != nil {
		t.Fatal(err)
	}
	self, err := tlog.ParseWitnessKey(signer.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	l.witnesses = append(l.witnesses, self)
	var out bytes.Buffer
	return &witness{src: l, log: trustOf(t, l), signer: signer, self: self, state: state, out: &out}, self, &out
}

func TestWitnessCosignsOnlyExtensions(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "web")
	state := filepath.Join(t.TempDir(), "state")
	w, self, _ := newTestWitness(t, l, state)

	if err := w.round(t.Context()); err != nil {
		t.Fatalf("first round: %v", err)
	}
	l.migrate("acme", "db")
	if err := w.round(t.Context()); err != nil {
		t.Fatalf("second round: %v", err)
	}
	if len(l.cosigns) != 2 {
		t.Fatalf("%d cosignatures submitted, want 2", len(l.cosigns))
	}
	lv, err := tlog.LogVerifier(l.origin, l.key.Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	cp, err := tlog.Open(l.cosigns[1], lv, []*tlog.WitnessVerifier{self}, 1)
	if err != nil || cp.Size != 8 {
		t.Fatalf("the second cosignature: %v, size %v; want a witnessed checkpoint of size 8", err, cp)
	}
	stored, _ := os.ReadFile(state)
	if !bytes.Equal(stored, l.cosigns[1]) {
		t.Errorf("state holds %q, want the cosigned checkpoint", stored)
	}

	// The keybroker shows the witness a log that does not extend what it cosigned.
	fork := forkedLog(t, l)
	fork.witnesses = l.witnesses
	fork.migrate("acme", "web")
	fork.migrate("acme", "web2")
	w.src = fork
	err = w.round(t.Context())
	if !errors.Is(err, tlog.ErrInconsistent) || !strings.Contains(err.Error(), "refusing to cosign") {
		t.Errorf("round on a forked log: %v, want a refusal wrapping tlog.ErrInconsistent", err)
	}
	if got := len(fork.cosigns); got != 0 {
		t.Errorf("%d cosignatures of the forked log submitted", got)
	}
	if after, _ := os.ReadFile(state); !bytes.Equal(after, stored) {
		t.Error("the witness's state changed after an inconsistent checkpoint")
	}
	if err := w.run(t.Context(), time.Hour, time.Minute, &bytes.Buffer{}); !errors.Is(err, tlog.ErrInconsistent) {
		t.Errorf("run on a forked log: %v, want it to end with tlog.ErrInconsistent", err)
	}
}

func TestCheckpointVerifyFlags(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "web")
	v := trustOf(t, l)
	if _, err := v.open(l.checkpoint()); err != nil {
		t.Errorf("open with the origin from the checkpoint: %v", err)
	}
	v.origin = "another/origin"
	if _, err := v.open(l.checkpoint()); !errors.Is(err, tlog.ErrBadSignature) {
		t.Errorf("open with another --origin: %v, want ErrBadSignature", err)
	}
	other := newTestLog(t)
	if _, err := trustOf(t, other).open(l.checkpoint()); !errors.Is(err, tlog.ErrBadSignature) {
		t.Errorf("open with another key: %v, want ErrBadSignature", err)
	}
	_, w, _ := newTestWitness(t, l, "")
	vw := trustOf(t, l)
	vw.witnesses, vw.minWitnesses = []*tlog.WitnessVerifier{w}, 1
	if _, err := vw.open(l.checkpoint()); !errors.Is(err, tlog.ErrTooFewWitnesses) {
		t.Errorf("open requiring a witness that did not cosign: %v, want ErrTooFewWitnesses", err)
	}
}

// TestLogOverNATS runs the log commands against a keybroker on real NATS and Vault that knows
// one witness: the witness cosigns the newest checkpoint, a tenant pins it and finds it
// witnessed, and a guest the log never saw has an empty history that verifies.
func TestLogOverNATS(t *testing.T) {
	srv := vaulttest.Start(t)
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	t.Setenv("LETHECTL_CONFIG", "")
	t.Setenv("LETHE_CONFIG", "")
	t.Setenv("LETHE_TENANT", "")
	key := filepath.Join(dir, "witness.key")
	out, errOut, code := runLethectl(t, "log", "witness", "keygen", "--name", "w.example", "--out", key, "-o", "json")
	if code != 0 {
		t.Fatalf("keygen: exit %d\n%s%s", code, out, errOut)
	}
	var wk struct{ VerifierKey string }
	if err := json.Unmarshal([]byte(out), &wk); err != nil {
		t.Fatal(err)
	}
	v, err := attest.NewVerifier(attest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	adminPub, adminKey, _ := ed25519.GenerateKey(rand.Reader)
	kb, err := keybroker.New(keybroker.Config{Vault: srv.Client, Verifier: v, Logger: log, LogOrigin: "kb.test/lethe", LogWitnesses: []string{wk.VerifierKey}, AdminKey: adminPub})
	if err != nil {
		t.Fatal(err)
	}
	pem, err := kb.PublicKeyPEM(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	pub := filepath.Join(dir, "keybroker.pub")
	if err := os.WriteFile(pub, pem, 0o644); err != nil {
		t.Fatal(err)
	}
	ns := serveKeybroker(t, kb, log)
	run := func(args ...string) string {
		t.Helper()
		out, errOut, code := runLethectl(t, append(args, "--nats-url", ns.URL)...)
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}

	// The key a tenant fetches is the keybroker's, with the log's name.
	fetched := filepath.Join(dir, "fetched.pub")
	out = run("keybroker", "pubkey", "--tenant", "acme", "--out", fetched)
	if b, err := os.ReadFile(fetched); err != nil || string(b) != string(pem) || !strings.Contains(out, "log origin  kb.test/lethe") {
		t.Errorf("keybroker pubkey: %q, file %q, %v", out, b, err)
	}

	state := filepath.Join(dir, "witness.state")
	if out := run("log", "witness", "run", "--once", "--key", key, "--state", state, "--pub", pub); !strings.Contains(out, "cosigned size 0") {
		t.Errorf("witness run: %q, want a cosignature of size 0", out)
	}
	pinned := filepath.Join(dir, "pinned")
	var cp checkpointView
	if err := json.Unmarshal([]byte(run("log", "checkpoint", "--witnessed", "--pub", pub, "--witness", wk.VerifierKey, "--out", pinned, "-o", "json")), &cp); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(checkpointView{Origin: "kb.test/lethe", Size: 0, Root: cp.Root, Witnesses: []string{"w.example"}}, cp); diff != "" {
		t.Errorf("witnessed checkpoint (-want +got):\n%s", diff)
	}
	if out := run("log", "prove-consistency", pinned, "--pub", pub); !strings.Contains(out, "CONSISTENT") {
		t.Errorf("prove-consistency: %q", out)
	}
	out = run("guests", "history", "web", "--for", "acme", "--verify", "--pub", pub, "--witness", wk.VerifierKey, "--witnessed", "--pinned", pinned)
	if !strings.Contains(out, "VERIFIED: 0 entries of acme/web") || !strings.Contains(out, "live epoch  none") {
		t.Errorf("history of a guest the log never saw: %q", out)
	}

	// The monitor: two denials of a registered tenant's guests in the log, every history
	// complete, the pin moved.
	tenantPub, _, _ := ed25519.GenerateKey(rand.Reader)
	signed, err := kbwire.SignAdmin(kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: tenantPub}, time.Now(), kbwire.MaxAdminValidity, adminKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kb.RegisterTenant(t.Context(), &kbwire.AdminRequest{Signed: signed}); err != nil {
		t.Fatal(err)
	}
	for _, vm := range []string{"web", "db"} {
		if _, err := kb.Release(t.Context(), &kbwire.ReleaseRequest{MigrationID: "m-" + vm, Tenant: "acme", VM: vm}); err == nil {
			t.Fatal("a release without evidence went through")
		}
	}
	out = run("log", "audit", "--pub", pub, "--pinned", pinned, "--update-pinned")
	for _, want := range []string{"acme/db", "acme/web", "complete", "audited 2 entries of 2 guests in log kb.test/lethe of size 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("log audit lacks %q:\n%s", want, out)
		}
	}
	if b, err := os.ReadFile(pinned); err != nil || !strings.HasPrefix(string(b), "kb.test/lethe\n2\n") {
		t.Errorf("the pin after a clean audit: %q, %v", b, err)
	}
	// A tenant is told at once that the audit is an operator's.
	if out, errOut, code := runLethectl(t, "log", "audit", "--pub", pub, "--tenant", "acme", "--nats-url", ns.URL); code == 0 || !strings.Contains(errOut, "operators only") {
		t.Errorf("a tenant ran the audit: exit %d\n%s%s", code, out, errOut)
	}
	// And the keybroker does not answer a tenant's inbox the leaves.
	tc := kbclient.New(ns.Connect(t, nats.CustomInboxPrefix("_INBOX.tenant.acme")), 2*time.Second)
	if _, err := tc.LogEntries(t.Context(), 0, 1); err == nil {
		t.Error("the keybroker answered a tenant the log's leaves")
	}
}

// TestProveConsistencySplitView gives prove-consistency two checkpoints of one size with two
// roots, both signed by the keybroker: it exits 1 naming a split view, without any network.
func TestProveConsistencySplitView(t *testing.T) {
	l := newTestLog(t)
	l.migrate("acme", "web")
	dir := t.TempDir()
	pub := l.writePub(dir)
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if err := os.WriteFile(a, l.checkpoint(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b, sameSizeFork(t, l).checkpoint(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LETHECTL_CONFIG", "")
	t.Setenv("LETHE_CONFIG", "")
	t.Setenv("XDG_CONFIG_HOME", dir)
	out, errOut, code := runLethectl(t, "log", "prove-consistency", a, a, "--pub", pub, "--nats-url", "nats://127.0.0.1:1")
	if code != 0 || !strings.Contains(out, "CONSISTENT: the log of size 4 extends the log of size 4") {
		t.Errorf("a checkpoint against itself: exit %d\n%s%s", code, out, errOut)
	}
	_, errOut, code = runLethectl(t, "log", "prove-consistency", a, b, "--pub", pub, "--nats-url", "nats://127.0.0.1:1")
	if code != 1 || !strings.Contains(errOut, "INCONSISTENT: ") || !strings.Contains(errOut, "split view") {
		t.Errorf("two roots of one size: exit %d, %q; want 1 naming a split view", code, errOut)
	}
}
