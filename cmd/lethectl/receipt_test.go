package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
	"github.com/lethe-cc/lethe/policy"
)

// receiptFiles are the files of a receipt verify test: the keybroker's public key, signed
// receipts of each outcome, and the signed policy they name.
// verifyCase is one run of lethectl receipt verify and what it must print.
type verifyCase struct {
	args      []string
	code      int
	stdout    []string // each must appear
	stderr    []string
	notStdout string
}

// runVerifyCases runs each case as "lethectl receipt verify --pub pub ARGS…".
func runVerifyCases(t *testing.T, pub string, tests map[string]verifyCase) {
	t.Helper()
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			stdout, stderr, code := runLethectl(t, append([]string{"receipt", "verify", "--pub", pub}, tc.args...)...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, stdout, stderr)
			}
			for _, s := range tc.stdout {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			for _, s := range tc.stderr {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr lacks %q:\n%s", s, stderr)
				}
			}
			if tc.notStdout != "" && strings.Contains(stdout, tc.notStdout) {
				t.Errorf("stdout has %q:\n%s", tc.notStdout, stdout)
			}
		})
	}
}

type receiptFiles struct {
	dir, pub, policy, otherPolicy string
	erased, aborted               string
	unverified, unverifiedNoEv    string
	policyDigest                  []byte
	erasedReceipt                 *receipt.Receipt
}

func writeReceiptFiles(t *testing.T) *receiptFiles {
	t.Helper()
	dir := t.TempDir()
	f := &receiptFiles{dir: dir}
	write := func(name string, b []byte) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kbPriv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))
	kbPub := kbPriv.Public().(ed25519.PublicKey)
	pubPEM, err := receipt.MarshalPublicKeyPEM(kbPub)
	if err != nil {
		t.Fatal(err)
	}
	f.pub = write("keybroker.pub", pubPEM)

	tenantKey := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{8}, ed25519.SeedSize))
	y, err := os.ReadFile(examplePolicy)
	if err != nil {
		t.Fatal(err)
	}
	signPolicy := func(name string, y []byte) string {
		env, err := policy.Sign(name, y, tenantKey)
		if err != nil {
			t.Fatal(err)
		}
		b, err := env.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return write(name+".signed", b)
	}
	f.policy = signPolicy("policy", y)
	f.otherPolicy = signPolicy("other", bytes.Replace(y, []byte("policySvn: 1"), []byte("policySvn: 2"), 1))
	sum := sha256.Sum256(y)
	f.policyDigest = sum[:]

	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	end := receipt.EndClaims{Platform: "emulated-sev-snp", EvidenceDigest: make([]byte, 32), Measurement: make([]byte, 48), TCB: "bl=3,tee=0,snp=8,ucode=115"}
	base := func(outcome receipt.Outcome, er *receipt.ErasureEvidence) *receipt.Receipt {
		return &receipt.Receipt{
			Kind: receipt.Kind, MigrationID: "m1", Tenant: "demo", VM: "web", Outcome: outcome,
			Policy: receipt.PolicyRef{Digest: f.policyDigest, SVN: 1},
			Source: end, Destination: end, Erasure: er,
			FromEpoch: 1, ToEpoch: 2,
			DestroyedKeys: []receipt.DestroyedKey{{Name: "lethe-mig-m1", LatestVersion: 1, DestroyedAt: at}, {Name: "lethe-demo-web-e1", LatestVersion: 1, DestroyedAt: at}},
			EndedAt:       at, IssuedAt: at,
		}
	}
	sign := func(name string, r *receipt.Receipt) string {
		env, err := receipt.Sign(r, kbPub, func(msg []byte) ([]byte, error) { return ed25519.Sign(kbPriv, msg), nil })
		if err != nil {
			t.Fatalf("signing the %s receipt: %v", name, err)
		}
		b, err := json.Marshal(env)
		if err != nil {
			t.Fatal(err)
		}
		return write(name+".receipt", b)
	}
	f.erasedReceipt = base(receipt.OutcomeErased, &receipt.ErasureEvidence{EndClaims: end, Statement: json.RawMessage(`{"type":"lethe.dev/erasure/v1"}`), Accepted: true})
	f.erased = sign("erased", f.erasedReceipt)
	f.aborted = sign("aborted", base(receipt.OutcomeAborted, nil))
	f.unverified = sign("unverified", base(receipt.OutcomeCommittedUnverifiedErasure, &receipt.ErasureEvidence{EndClaims: end, Accepted: false, Reasons: []string{"erasure.deadline: 90s after the commit, want at most 60s"}}))
	f.unverifiedNoEv = sign("unverified-no-evidence", base(receipt.OutcomeCommittedUnverifiedErasure, nil))
	return f
}

func TestReceiptVerify(t *testing.T) {
	f := writeReceiptFiles(t)
	digest := hex.EncodeToString(f.policyDigest)
	tests := map[string]verifyCase{
		"valid": {args: []string{f.erased}, stdout: []string{"VALID: signed by keybroker key sha256:", "outcome     erased"}},
		"every expectation met": {
			args:   []string{f.erased, "--migration", "m1", "--tenant", "demo", "--vm", "web", "--policy", f.policy, "--require-erased"},
			stdout: []string{"VALID", "matches     migration m1, tenant demo, vm web, policy digest " + digest + ", outcome erased"},
		},
		"policy digest met":                         {args: []string{f.erased, "--policy-digest", digest}, stdout: []string{"VALID"}},
		"policy digest met, upper case with prefix": {args: []string{f.erased, "--policy-digest", "sha256:" + strings.ToUpper(digest)}, stdout: []string{"VALID"}},
		"another migration": {
			args: []string{f.erased, "--migration", "m2"}, code: 1,
			stdout: []string{`MISMATCH: migration "m1" in the receipt, expected "m2"`, "but not the receipt expected"}, notStdout: "VALID",
		},
		"another tenant and vm": {
			args: []string{f.erased, "--tenant", "acme", "--vm", "db"}, code: 1,
			stdout: []string{`MISMATCH: tenant "demo" in the receipt, expected "acme"`, `MISMATCH: vm "web" in the receipt, expected "db"`},
		},
		"another policy": {
			args: []string{f.erased, "--policy", f.otherPolicy}, code: 1,
			stdout: []string{"MISMATCH: policy digest " + digest + " (policySvn 1) in the receipt, expected "},
		},
		"another policy digest": {
			args: []string{f.erased, "--policy-digest", strings.Repeat("ab", 32)}, code: 1,
			stdout: []string{"MISMATCH: policy digest " + digest + " (policySvn 1) in the receipt, expected " + strings.Repeat("ab", 32)},
		},
		"aborted, erasure required": {
			args: []string{f.aborted, "--require-erased"}, code: 1,
			stdout: []string{`MISMATCH: outcome "aborted" in the receipt, --require-erased expects "erased"`},
		},
		"aborted": {args: []string{f.aborted}, stdout: []string{"VALID", "outcome     aborted"}},
		"erasure not proven": {
			args: []string{f.unverified},
			stdout: []string{
				"VALID", "WARNING: committed, erasure NOT proven: the tenant's policy did not accept the source's erasure evidence: erasure.deadline: 90s after the commit, want at most 60s",
				"outcome     committed-unverified-erasure: committed, erasure NOT proven (epoch 1 -> 2)",
			},
		},
		"erasure not proven, no evidence": {
			args:   []string{f.unverifiedNoEv},
			stdout: []string{"WARNING: committed, erasure NOT proven: the source sent no erasure evidence", "erasure     none"},
		},
		"erasure not proven, erasure required": {
			args: []string{f.unverified, "--require-erased", "--migration", "m1"}, code: 1,
			stdout:    []string{`MISMATCH: outcome "committed-unverified-erasure" (committed, erasure NOT proven: the tenant's policy did not accept the source's erasure evidence: erasure.deadline: 90s after the commit, want at most 60s), --require-erased expects "erased"`},
			notStdout: "migration \"m1\"",
		},
		"json, mismatch": {
			args: []string{f.erased, "-o", "json", "--vm", "db"}, code: 1,
			stderr:    []string{`MISMATCH: vm "web" in the receipt, expected "db"`},
			notStdout: "{",
		},
		"json, erasure not proven": {
			args:   []string{f.unverified, "-o", "json"},
			stdout: []string{`"outcome": "committed-unverified-erasure"`},
			stderr: []string{"WARNING: committed, erasure NOT proven"},
		},
		"bad policy digest":         {args: []string{f.erased, "--policy-digest", "abc"}, code: 1, stderr: []string{"--policy-digest"}},
		"policy and policy digest":  {args: []string{f.erased, "--policy", f.policy, "--policy-digest", digest}, code: 1, stderr: []string{"policy"}},
		"policy not an envelope":    {args: []string{f.erased, "--policy", examplePolicy}, code: 1, stderr: []string{"signed policy envelope"}},
		"policy file missing":       {args: []string{f.erased, "--policy", filepath.Join(f.dir, "none")}, code: 1, stderr: []string{"reading policy"}},
		"a policy is not a receipt": {args: []string{f.policy}, code: 1, stdout: []string{"INVALID: "}},
		"receipt file missing":      {args: []string{filepath.Join(f.dir, "none")}, code: 1, stderr: []string{"reading receipt"}},
	}
	runVerifyCases(t, f.pub, tests)
}

// TestReceiptVerifyJSON checks that -o json prints the receipt, as before the expectations.
func TestReceiptVerifyJSON(t *testing.T) {
	f := writeReceiptFiles(t)
	stdout, stderr, code := runLethectl(t, "receipt", "verify", "--pub", f.pub, f.erased, "-o", "json", "--migration", "m1", "--require-erased")
	if code != 0 {
		t.Fatalf("exit %d\n%s%s", code, stdout, stderr)
	}
	var got receipt.Receipt
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("decoding the output: %v\n%s", err, stdout)
	}
	// Compared as compact JSON: the output is indented, the statement in it too.
	want, _ := json.Marshal(f.erasedReceipt)
	printed, _ := json.Marshal(&got)
	if diff := cmp.Diff(string(want), string(printed)); diff != "" {
		t.Errorf("receipt (-signed +printed):\n%s", diff)
	}
}

// TestReceiptVerifyRefusesAmbiguousEnvelopes checks that verify (and show) refuse envelopes
// that DSSE decoders read differently, above all a payload under a second spelling of
// "payload", and bad signatures.
func TestReceiptVerifyRefusesAmbiguousEnvelopes(t *testing.T) {
	f := writeReceiptFiles(t)
	good, err := os.ReadFile(f.erased)
	if err != nil {
		t.Fatal(err)
	}
	var env map[string]any
	if err := json.Unmarshal(good, &env); err != nil {
		t.Fatal(err)
	}
	signed := env["payload"].(string)
	// The unsigned payload: the same receipt, of another migration.
	p, err := base64.StdEncoding.DecodeString(signed)
	if err != nil {
		t.Fatal(err)
	}
	unsigned := base64.StdEncoding.EncodeToString(bytes.Replace(p, []byte(`"migrationId":"m1"`), []byte(`"migrationId":"m9"`), 1))
	rest := func(extra string) string {
		sigs, _ := json.Marshal(env["signatures"])
		return fmt.Sprintf(`"payloadType":%q,%s"signatures":%s`, env["payloadType"], extra, sigs)
	}
	tests := map[string]string{
		// encoding/json reads the last spelling (the signed one); DSSE verifiers "payload".
		"signed under Payload, after payload": fmt.Sprintf(`{"payload":%q,"Payload":%q,%s}`, unsigned, signed, rest("")),
		"signed under payload, Payload after": fmt.Sprintf(`{"payload":%q,"Payload":%q,%s}`, signed, unsigned, rest("")),
		"payload twice":                       fmt.Sprintf(`{"payload":%q,"payload":%q,%s}`, unsigned, signed, rest("")),
		"PayloadType":                         strings.Replace(string(good), `"payloadType"`, `"PayloadType"`, 1),
		"trailing data":                       string(good) + "{}",
		"tampered payload":                    fmt.Sprintf(`{"payload":%q,%s}`, unsigned, rest("")),
	}
	for name, envelope := range tests {
		t.Run(name, func(t *testing.T) {
			file := filepath.Join(f.dir, "attack.receipt")
			if err := os.WriteFile(file, []byte(envelope), 0o644); err != nil {
				t.Fatal(err)
			}
			stdout, stderr, code := runLethectl(t, "receipt", "verify", "--pub", f.pub, file)
			if code == 0 || !strings.HasPrefix(stdout, "INVALID: ") || strings.Contains(stdout, "VALID: signed") {
				t.Errorf("verify: exit %d, want 1 and INVALID\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
			}
		})
	}
}

// logProofFiles are the files of a log proof test: proofs of the erased receipt's ending
// against checkpoints of a log of a few guests' entries, good and bad.
type logProofFiles struct {
	good, otherReceipt, notEnding, tamperedProof, tamperedEntry, otherKey, malformed string
	// sidecar is a copy of the erased receipt with the good proof beside it (FILE.log.json).
	sidecar string
}

const testLogOrigin = "kb.test/log"

func writeLogProofFiles(t *testing.T, f *receiptFiles) *logProofFiles {
	t.Helper()
	kbPriv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize)) // the receipts' key
	otherPriv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, ed25519.SeedSize))
	payload := func(file string) []byte {
		t.Helper()
		env, err := readReceipt(file)
		if err != nil {
			t.Fatal(err)
		}
		return env.Payload
	}
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	var tr tlog.Tree
	var leaves [][]byte
	heads := map[string]*tlog.Link{} // each guest's newest entry
	seqs := map[string]uint64{}
	add := func(e tlog.Entry) uint64 {
		t.Helper()
		guest := e.Tenant + "/" + e.VM
		seqs[guest]++
		e.Type, e.Time, e.Seq, e.Prev = tlog.EntryType, at, seqs[guest], heads[guest]
		leaf, err := e.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		i := tr.Size()
		tr.Append(tlog.LeafHash(leaf))
		leaves = append(leaves, leaf)
		heads[guest] = &tlog.Link{Index: i, Hash: tlog.LeafHash(leaf)}
		return i
	}
	add(tlog.Entry{Kind: tlog.KindAdopt, Tenant: "demo", VM: "web", MigrationID: "a1", ToEpoch: 1, Host: "h1"})
	add(tlog.Entry{Kind: tlog.KindAdopt, Tenant: "demo", VM: "db", MigrationID: "a2", ToEpoch: 1, Host: "h1"})
	release := add(tlog.Entry{Kind: tlog.KindRelease, Tenant: "demo", VM: "web", MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Host: "h2"})
	// The aborted receipt is of m1 too: a proof of its ending is a proof of another receipt.
	aborted := add(tlog.Entry{Kind: tlog.KindAbort, Tenant: "demo", VM: "web", MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Statement: tlog.StatementDigest(payload(f.aborted)), Outcome: "aborted"})
	erased := add(tlog.Entry{Kind: tlog.KindCommit, Tenant: "demo", VM: "web", MigrationID: "m1", FromEpoch: 1, ToEpoch: 2, Statement: tlog.StatementDigest(payload(f.erased)), Outcome: "erased"})
	add(tlog.Entry{Kind: tlog.KindDeny, Tenant: "demo", VM: "db", MigrationID: "m2", Op: "release", Reasons: []string{"no"}})

	size := tr.Size()
	root, err := tr.Root(size)
	if err != nil {
		t.Fatal(err)
	}
	checkpoint := func(priv ed25519.PrivateKey) []byte {
		t.Helper()
		cp, err := tlog.Sign(tlog.Checkpoint{Origin: testLogOrigin, Size: size, Root: root}, priv.Public().(ed25519.PublicKey),
			func(msg []byte) ([]byte, error) { return ed25519.Sign(priv, msg), nil })
		if err != nil {
			t.Fatal(err)
		}
		return cp
	}
	inclusion := func(i uint64, priv ed25519.PrivateKey) *tlog.Inclusion {
		t.Helper()
		p, err := tr.InclusionProof(i, size)
		if err != nil {
			t.Fatal(err)
		}
		return &tlog.Inclusion{Checkpoint: checkpoint(priv), Entry: tlog.ProvenEntry{Index: i, Leaf: leaves[i], Proof: p}}
	}
	write := func(name string, inc *tlog.Inclusion) string {
		t.Helper()
		b, err := json.Marshal(inc)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(f.dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	l := &logProofFiles{}
	l.good = write("good.log.json", inclusion(erased, kbPriv))
	l.otherReceipt = write("other-receipt.log.json", inclusion(aborted, kbPriv))
	l.notEnding = write("not-ending.log.json", inclusion(release, kbPriv))
	bad := inclusion(erased, kbPriv)
	bad.Entry.Proof[0][0] ^= 1
	l.tamperedProof = write("tampered-proof.log.json", bad)
	bad = inclusion(erased, kbPriv)
	bad.Entry.Leaf = bytes.Replace(bad.Entry.Leaf, []byte(`"outcome":"erased"`), []byte(`"outcome":"aborted"`), 1)
	l.tamperedEntry = write("tampered-entry.log.json", bad)
	l.otherKey = write("other-key.log.json", inclusion(erased, otherPriv))
	l.malformed = filepath.Join(f.dir, "malformed.log.json")
	if err := os.WriteFile(l.malformed, []byte(`{"checkpoint":"","entry":{},"extra":1}`), 0o644); err != nil {
		t.Fatal(err)
	}

	sidecarDir := t.TempDir()
	l.sidecar = filepath.Join(sidecarDir, "m1.receipt")
	for from, to := range map[string]string{f.erased: l.sidecar, l.good: l.sidecar + ".log.json"} {
		b, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(to, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

func TestReceiptVerifyLogProof(t *testing.T) {
	f := writeReceiptFiles(t)
	l := writeLogProofFiles(t, f)
	logged := "LOGGED: the commit is entry 4 of the residency log " + testLogOrigin + " (checkpoint of size 6, signed by the same key)"
	tests := map[string]verifyCase{
		"valid":                  {args: []string{f.erased, "--log-proof", l.good}, stdout: []string{"VALID: signed", logged, "outcome     erased"}},
		"valid, logged required": {args: []string{f.erased, "--log-proof", l.good, "--require-logged", "--require-erased"}, stdout: []string{logged, "matches     outcome erased, logged"}},
		"beside the receipt":     {args: []string{l.sidecar, "--require-logged"}, stdout: []string{logged}},
		"log named":              {args: []string{f.erased, "--log-proof", l.good, "--log-origin", testLogOrigin}, stdout: []string{logged}},
		"json":                   {args: []string{f.erased, "--log-proof", l.good, "-o", "json"}, stdout: []string{`"outcome": "erased"`}, stderr: []string{logged}},
		"no proof":               {args: []string{f.erased}, stdout: []string{"VALID", "NOT CHECKED: no log proof given"}, notStdout: "LOGGED"},
		"no proof, logged required": {
			args: []string{f.erased, "--require-logged"}, code: 1,
			stdout: []string{"MISMATCH: no log proof (--log-proof, or " + f.erased + ".log.json), --require-logged expects one"}, notStdout: "VALID: signed",
		},
		"proof of another receipt": {
			args: []string{f.erased, "--log-proof", l.otherReceipt}, code: 1,
			stdout:    []string{"INVALID LOG PROOF: " + l.otherReceipt + ": checking that the log's checkpoint of size 6 holds this receipt's ending: ", "the entry names another receipt"},
			notStdout: "VALID: signed",
		},
		"proof of another receipt, json": {
			args: []string{f.erased, "--log-proof", l.otherReceipt, "-o", "json"}, code: 1,
			stderr: []string{"INVALID LOG PROOF: ", "the entry names another receipt"}, notStdout: "{",
		},
		"proof of a release": {
			args: []string{f.erased, "--log-proof", l.notEnding}, code: 1,
			stdout: []string{"INVALID LOG PROOF: ", "the entry is a release, not an ending"},
		},
		"tampered proof": {
			args: []string{f.erased, "--log-proof", l.tamperedProof}, code: 1,
			stdout: []string{"INVALID LOG PROOF: ", "the receipt's entry is not in the log"},
		},
		"tampered entry": {
			args: []string{f.erased, "--log-proof", l.tamperedEntry}, code: 1,
			stdout: []string{"INVALID LOG PROOF: ", "the receipt's entry is not in the log"},
		},
		"checkpoint signed by another key": {
			args: []string{f.erased, "--log-proof", l.otherKey}, code: 1,
			stdout: []string{"INVALID LOG PROOF: " + l.otherKey + ": checking the checkpoint's signature by the keybroker key sha256:", `as log "` + testLogOrigin + `"`, "checkpoint not signed by the log's key"},
		},
		"another log": {
			args: []string{f.erased, "--log-proof", l.good, "--log-origin", "other.test/log"}, code: 1,
			stdout: []string{`INVALID LOG PROOF: `, `as log "other.test/log"`, "checkpoint not signed by the log's key"},
		},
		"malformed proof": {
			args: []string{f.erased, "--log-proof", l.malformed}, code: 1,
			stdout: []string{"INVALID LOG PROOF: " + l.malformed + ": decoding the proof: ", "extra"},
		},
		"proof file missing": {args: []string{f.erased, "--log-proof", filepath.Join(f.dir, "none")}, code: 1, stderr: []string{"reading log proof"}},
	}
	runVerifyCases(t, f.pub, tests)
}

// TestSaveReceipt checks where receipt get writes a receipt and its log proof.
func TestSaveReceipt(t *testing.T) {
	envelope, proof := []byte(`{"payload":"e30="}`), []byte(`{"checkpoint":"Y3A="}`)
	tests := map[string]struct {
		log         []byte
		out, logOut string // relative to a fresh directory; "" for none
		wantLogFile string
		wantFiles   map[string]string
	}{
		"beside the receipt": {
			log: proof, out: "r.json", wantLogFile: "r.json.log.json",
			wantFiles: map[string]string{"r.json": string(envelope) + "\n", "r.json.log.json": string(proof) + "\n"},
		},
		"named": {
			log: proof, out: "r.json", logOut: "p.json", wantLogFile: "p.json",
			wantFiles: map[string]string{"r.json": string(envelope) + "\n", "p.json": string(proof) + "\n"},
		},
		"proof only": {
			log: proof, logOut: "p.json", wantLogFile: "p.json",
			wantFiles: map[string]string{"p.json": string(proof) + "\n"},
		},
		"no proof held": {
			out: "r.json", logOut: "p.json",
			wantFiles: map[string]string{"r.json": string(envelope) + "\n"},
		},
		"nothing asked": {log: proof, wantFiles: map[string]string{}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			in := func(name string) string {
				if name == "" {
					return ""
				}
				return filepath.Join(dir, name)
			}
			logFile, err := saveReceipt(&broker.Receipt{Envelope: envelope, Log: tc.log}, in(tc.out), in(tc.logOut))
			if err != nil {
				t.Fatal(err)
			}
			if logFile != in(tc.wantLogFile) {
				t.Errorf("log proof written to %q, want %q", logFile, in(tc.wantLogFile))
			}
			got := map[string]string{}
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				b, err := os.ReadFile(filepath.Join(dir, e.Name()))
				if err != nil {
					t.Fatal(err)
				}
				got[e.Name()] = string(b)
			}
			if diff := cmp.Diff(tc.wantFiles, got); diff != "" {
				t.Errorf("files (-want +got):\n%s", diff)
			}
		})
	}
}

// FuzzLogProof feeds verifyLogProof, which decodes a log proof from an untrusted file, arbitrary
// bytes: it must refuse them with an error, never panic, and never accept a proof of a receipt
// the log does not name.
func FuzzLogProof(f *testing.F) {
	kbPriv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))
	var tr tlog.Tree
	payload := []byte(`{"receipt":"seed"}`)
	e := tlog.Entry{Type: tlog.EntryType, Kind: tlog.KindCommit, Tenant: "demo", VM: "web", Seq: 1, MigrationID: "m1", Statement: tlog.StatementDigest(payload)}
	leaf, err := e.Marshal()
	if err != nil {
		f.Fatal(err)
	}
	tr.Append(tlog.LeafHash(leaf))
	tr.Append(tlog.LeafHash([]byte("other")))
	root, err := tr.Root(2)
	if err != nil {
		f.Fatal(err)
	}
	p, err := tr.InclusionProof(0, 2)
	if err != nil {
		f.Fatal(err)
	}
	cp, err := tlog.Sign(tlog.Checkpoint{Origin: testLogOrigin, Size: 2, Root: root}, kbPriv.Public().(ed25519.PublicKey),
		func(msg []byte) ([]byte, error) { return ed25519.Sign(kbPriv, msg), nil })
	if err != nil {
		f.Fatal(err)
	}
	good, err := json.Marshal(&tlog.Inclusion{Checkpoint: cp, Entry: tlog.ProvenEntry{Index: 0, Leaf: leaf, Proof: p}})
	if err != nil {
		f.Fatal(err)
	}
	pub := kbPriv.Public().(ed25519.PublicKey)
	if _, err := verifyLogProof(good, pub, "", "m1", payload); err != nil {
		f.Fatalf("the seed proof does not verify: %v", err)
	}
	f.Add(good)
	f.Add([]byte(`{"checkpoint":"","entry":{"index":0,"leaf":"","proof":[]}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := verifyLogProof(b, pub, "", "m1", []byte(`{"receipt":"another"}`)); err == nil {
			t.Errorf("a proof of another receipt verified: %q", b)
		}
	})
}
