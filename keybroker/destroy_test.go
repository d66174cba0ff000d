package keybroker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
)

// released adopts vm and releases migration id for it.
func (e *env) released(id, vm string) (*migration, *kbwire.AdoptResponse, *kbwire.ReleaseResponse) {
	e.t.Helper()
	ad := e.adopt(vm)
	m := e.newMigration(id, vm, "destination", e.signedPolicy(1, nil))
	resp, err := e.kb.Release(e.t.Context(), m.req)
	if err != nil {
		e.t.Fatalf("Release: %v", err)
	}
	return m, ad, resp
}

// commitAck returns the destination's commit acknowledgement of migration m, MACed under the
// transfer key its release sealed to the destination (opened with the test agent's HPKE key).
func commitAck(t testing.TB, m *migration, rel *kbwire.ReleaseResponse) []byte {
	t.Helper()
	keys, err := m.dst.key.Open(m.req.MigrationID, attest.RoleDestination, rel.SealedDestination)
	if err != nil {
		t.Fatalf("opening the destination's keys: %v", err)
	}
	return keybrokertest.CommitAck(t, keys.TK, m.req.MigrationID)
}

// commit returns a proven commit of a released migration: the destination's commit
// acknowledgement and erasure evidence made on the source's platform.
func (e *env) commit(m *migration, rel *kbwire.ReleaseResponse) *kbwire.DestroyRequest {
	e.t.Helper()
	id := m.req.MigrationID
	erased := e.attest("source", id, attest.RoleErased, keybrokertest.ErasureStatement(e.t, id))
	return &kbwire.DestroyRequest{
		MigrationID: id, Tenant: m.req.Tenant, VM: m.req.VM, Ending: kbwire.Commit,
		CommitAck: commitAck(e.t, m, rel), Erasure: &erased.att,
	}
}

func (e *env) verifyReceipt(env *receipt.Envelope) *receipt.Receipt {
	e.t.Helper()
	pub, err := e.kb.PublicKey(e.t.Context())
	if err != nil {
		e.t.Fatal(err)
	}
	r, err := receipt.Verify(env, pub)
	if err != nil {
		e.t.Fatalf("verifying receipt: %v", err)
	}
	return r
}

func TestCommitErasesSource(t *testing.T) {
	e := newEnv(t)
	m, adopted, rel := e.released("m1", "vm1")
	req := e.commit(m, rel)

	resp, err := e.kb.Destroy(t.Context(), req)
	if err != nil {
		t.Fatalf("Destroy(commit): %v", err)
	}
	r := e.verifyReceipt(resp.Receipt)

	// The epoch-1 key is gone, and the wrapped MDK_1 can no longer be unwrapped.
	if e.transitKeyExists("lethe-demo-vm1-e1") || e.transitKeyExists("lethe-mig-m1") {
		t.Errorf("keys left after commit: %v", e.transitKeys())
	}
	if _, err := e.admin.Logical().WriteWithContext(t.Context(), "transit/decrypt/lethe-demo-vm1-e1", map[string]any{"ciphertext": adopted.WrappedMDK}); err == nil {
		t.Errorf("MDK_1 still unwraps after commit")
	}
	// The destination's epoch lives on.
	if !e.transitKeyExists("lethe-demo-vm1-e2") {
		t.Errorf("commit destroyed the destination's epoch key")
	}
	if g := e.guest("vm1"); g.Epoch != 2 || g.WrappedMDK != rel.WrappedMDK || g.Migration != nil {
		t.Errorf("guest after commit: epoch %d, migration %+v", g.Epoch, g.Migration)
	}

	srcD, dstD, erD := m.req.Source.Evidence.Digest(), m.req.Destination.Evidence.Digest(), req.Erasure.Evidence.Digest()
	if r.Outcome != receipt.OutcomeErased || r.FromEpoch != 1 || r.ToEpoch != 2 {
		t.Errorf("receipt outcome %s, epochs %d -> %d", r.Outcome, r.FromEpoch, r.ToEpoch)
	}
	if diff := cmp.Diff([]string{"lethe-mig-m1", "lethe-demo-vm1-e1"}, keyNames(r.DestroyedKeys)); diff != "" {
		t.Errorf("destroyed keys (-want +got):\n%s", diff)
	}
	if string(r.Source.EvidenceDigest) != string(srcD[:]) || string(r.Destination.EvidenceDigest) != string(dstD[:]) {
		t.Errorf("receipt evidence digests differ from the release's")
	}
	if r.Erasure == nil || string(r.Erasure.EvidenceDigest) != string(erD[:]) || string(r.Erasure.Statement) != string(keybrokertest.ErasureStatement(t, "m1")) || !r.Erasure.Accepted {
		t.Fatalf("receipt erasure %+v", r.Erasure)
	}
	// The erasure evidence's claims are quoted, and name the source's machine.
	if err := r.Erasure.SameEnd(r.Source); err != nil || len(r.Erasure.ChipID) == 0 || r.Erasure.Platform != "emulated-sev-snp" {
		t.Errorf("receipt erasure claims %+v, source %+v: %v", r.Erasure.EndClaims, r.Source, err)
	}
	if d := sha256.Sum256(req.CommitAck); !bytes.Equal(r.CommitAckDigest, d[:]) {
		t.Errorf("receipt commit acknowledgement digest %x, want %x", r.CommitAckDigest, d)
	}
	if string(r.CleanMemory) != string(keybrokertest.CleanStatement(t)) {
		t.Errorf("receipt clean-memory statement %s", r.CleanMemory)
	}
	if r.Policy.SVN != 1 || string(r.Policy.Digest) != string(rel.PolicyDigest) {
		t.Errorf("receipt policy %+v", r.Policy)
	}

	// Idempotent: the same ending again returns the same receipt, without its proof (the
	// migration key that would check it is gone).
	again, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit})
	if err != nil || string(again.Receipt.Payload) != string(resp.Receipt.Payload) {
		t.Errorf("repeated commit: %v", err)
	}
	ev := e.audit.last(t)
	if ev.Kind != EventDestroy || ev.Decision != DecisionAllow || len(ev.ErasureEvidence) == 0 {
		t.Errorf("audit event %+v", ev)
	}
}

func keyNames(ks []receipt.DestroyedKey) []string {
	var out []string
	for _, k := range ks {
		out = append(out, k.Name)
	}
	return out
}

func TestAbortErasesDestination(t *testing.T) {
	e := newEnv(t)
	_, adopted, _ := e.released("m1", "vm1")
	resp, err := e.kb.Destroy(t.Context(), e.abort("m1", "vm1"))
	if err != nil {
		t.Fatalf("Destroy(abort): %v", err)
	}
	r := e.verifyReceipt(resp.Receipt)
	if r.Outcome != receipt.OutcomeAborted {
		t.Errorf("outcome %s", r.Outcome)
	}
	if diff := cmp.Diff([]string{"lethe-mig-m1", "lethe-demo-vm1-e2"}, keyNames(r.DestroyedKeys)); diff != "" {
		t.Errorf("destroyed keys (-want +got):\n%s", diff)
	}
	if !e.transitKeyExists("lethe-demo-vm1-e1") {
		t.Fatalf("abort destroyed the source's epoch key")
	}
	if g := e.guest("vm1"); g.Epoch != 1 || g.WrappedMDK != adopted.WrappedMDK {
		t.Errorf("guest after abort: %+v", g)
	}
	// The source's MDK_1 still unwraps: the guest lives on at the source.
	if _, err := e.kb.keys.decrypt(t.Context(), "lethe-demo-vm1-e1", adopted.WrappedMDK); err != nil {
		t.Errorf("MDK_1 after abort: %v", err)
	}
}

func TestBothEpochsRefused(t *testing.T) {
	e := newEnv(t)
	m, _, rel := e.released("m1", "vm1")
	if _, err := e.kb.Destroy(t.Context(), e.commit(m, rel)); err != nil {
		t.Fatal(err)
	}
	_, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort})
	if !errors.Is(err, ErrBothEpochs) {
		t.Fatalf("abort after commit = %v, want ErrBothEpochs", err)
	}
	if !e.transitKeyExists("lethe-demo-vm1-e2") {
		t.Fatalf("the live epoch's key was destroyed")
	}
	if ev := e.audit.last(t); ev.Decision != DecisionDeny {
		t.Errorf("refusal audited as %q", ev.Decision)
	}
}

func TestDestructionPlan(t *testing.T) {
	tests := map[string]struct {
		g       guestRecord
		want    []string
		wantErr error
	}{
		"commit": {
			g:    guestRecord{Epoch: 3, Migration: &migrationRecord{ID: "m", State: stateCommitted, FromEpoch: 2, ToEpoch: 3}},
			want: []string{"lethe-mig-m", "lethe-t-v-e2"},
		},
		"abort": {
			g:    guestRecord{Epoch: 2, Migration: &migrationRecord{ID: "m", State: stateAborted, FromEpoch: 2, ToEpoch: 3}},
			want: []string{"lethe-mig-m", "lethe-t-v-e3"},
		},
		"commit not recorded in the epoch": {
			g:       guestRecord{Epoch: 2, Migration: &migrationRecord{ID: "m", State: stateCommitted, FromEpoch: 2, ToEpoch: 3}},
			wantErr: ErrBothEpochs,
		},
		"abort of the live epoch": {
			g:       guestRecord{Epoch: 3, Migration: &migrationRecord{ID: "m", State: stateAborted, FromEpoch: 2, ToEpoch: 3}},
			wantErr: ErrBothEpochs,
		},
		"epochs not adjacent": {
			g:       guestRecord{Epoch: 5, Migration: &migrationRecord{ID: "m", State: stateCommitted, FromEpoch: 2, ToEpoch: 5}},
			wantErr: ErrBothEpochs,
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := destructionPlan("t", "v", &tt.g)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("destructionPlan = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("plan (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDestroyVaultDown(t *testing.T) {
	e := newEnv(t)
	m, _, rel := e.released("m1", "vm1")
	if _, err := e.kb.PublicKey(t.Context()); err != nil {
		t.Fatal(err)
	}
	req := e.commit(m, rel)

	// With Vault unreachable the commit cannot be proven: nothing is journaled.
	e.proxy.Cut()
	_, err := e.kb.Destroy(t.Context(), req)
	e.proxy.Restore()
	if !errors.Is(err, ErrVaultUnavailable) || errors.Is(err, ErrDestructionPending) {
		t.Fatalf("Destroy with Vault down = %v, want ErrVaultUnavailable and nothing pending", err)
	}
	if ev := e.audit.last(t); ev.Kind != EventDestroy || ev.Decision != DecisionError {
		t.Errorf("audit event %+v, want a destroy error", ev)
	}

	// Vault goes away once the commit is proven and journaled: while keys are destroyed.
	e.proxy.Block(func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/transit/keys/") })
	_, err = e.kb.Destroy(t.Context(), req)
	e.proxy.Cut()
	if !errors.Is(err, ErrDestructionPending) || !errors.Is(err, ErrVaultUnavailable) {
		t.Fatalf("Destroy with Vault gone after the proof = %v, want ErrDestructionPending", err)
	}
	// A repeat (the broker retrying) finds the destruction journaled, its proof checked.
	if _, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit}); !errors.Is(err, ErrDestructionPending) {
		t.Fatalf("repeated Destroy while pending = %v, want ErrDestructionPending", err)
	}
	// Neither the journaled entry nor a request can end it the other way, or for another guest.
	for name, req := range map[string]*kbwire.DestroyRequest{
		"abort":         {MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort},
		"another guest": {MigrationID: "m1", Tenant: "demo", VM: "vm2", Ending: kbwire.Commit},
	} {
		if _, err := e.kb.Destroy(t.Context(), req); errors.Is(err, ErrDestructionPending) || !errors.Is(err, ErrBothEpochs) && !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%s while the commit is pending = %v, want a refusal", name, err)
		}
	}
	if _, err := e.kb.Receipt(t.Context(), "m1"); !errors.Is(err, ErrDestructionPending) {
		t.Fatalf("Receipt while pending = %v, want ErrDestructionPending", err)
	}
	// The pending destruction survives a restart of the keybroker: a second instance on the
	// same state directory finds it in the journal.
	kb2, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kb2.Receipt(t.Context(), "m1"); !errors.Is(err, ErrDestructionPending) {
		t.Fatalf("restarted keybroker: Receipt = %v, want ErrDestructionPending", err)
	}
	if !e.transitKeyExists("lethe-demo-vm1-e1") {
		t.Fatalf("keys vanished while Vault was unreachable")
	}

	e.proxy.Restore()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error)
	go func() { done <- kb2.Run(ctx) }()
	env, err := kb2.AwaitReceipt(t.Context(), "m1")
	cancel()
	<-done
	if err != nil {
		t.Fatalf("AwaitReceipt: %v", err)
	}
	r := e.verifyReceipt(env)
	if e.transitKeyExists("lethe-demo-vm1-e1") || e.transitKeyExists("lethe-mig-m1") {
		t.Errorf("keys left after the retried destruction: %v", e.transitKeys())
	}
	if r.Outcome != receipt.OutcomeErased || len(r.DestroyedKeys) != 2 {
		t.Errorf("receipt %+v", r)
	}
	for _, k := range r.DestroyedKeys {
		if k.LatestVersion != 1 {
			t.Errorf("destroyed key %s: latest version %d, want 1", k.Name, k.LatestVersion)
		}
	}
}

func TestTamperedReceiptRejected(t *testing.T) {
	e := newEnv(t)
	e.released("m1", "vm1")
	resp, err := e.kb.Destroy(t.Context(), e.abort("m1", "vm1"))
	if err != nil {
		t.Fatal(err)
	}
	pub, err := e.kb.PublicKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tampered := *resp.Receipt
	tampered.Payload = bytes.Replace(resp.Receipt.Payload, []byte(`"aborted"`), []byte(`"erased"`), 1)
	if _, err := receipt.Verify(&tampered, pub); !errors.Is(err, receipt.ErrInvalid) {
		t.Fatalf("Verify(tampered) = %v, want ErrInvalid", err)
	}
}

// TestCommitRequiresProof: a commit that lacks its proof, or whose proof comes from elsewhere,
// is refused and audited, and leaves the source's keys and the migration as they were.
func TestCommitRequiresProof(t *testing.T) {
	e := newEnv(t)
	m, _, rel := e.released("m1", "vm1")
	e.adopt("vm2")
	other := e.newMigration("m2", "vm2", "destination", e.signedPolicy(1, nil))
	otherRel, err := e.kb.Release(t.Context(), other.req)
	if err != nil {
		t.Fatal(err)
	}
	erasure := func(plat string, statement []byte) *kbwire.Attestation {
		return &e.attest(plat, "m1", attest.RoleErased, statement).att
	}
	good := keybrokertest.ErasureStatement(t, "m1")
	// The source zeroized the transfer key but not MDK_1: the policy does not accept it.
	partial, err := attest.ErasureStatement{MigrationID: "m1", KeysZeroized: []string{attest.KeyTransfer}}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	ack := commitAck(t, m, rel)
	forged := keybrokertest.CommitAck(t, bytes.Repeat([]byte{7}, 32), "m1")
	var tampered grant.CommitAck
	if err := json.Unmarshal(ack, &tampered); err != nil {
		t.Fatal(err)
	}
	tampered.Transcript[0] ^= 1
	tamperedAck, _ := json.Marshal(tampered)

	// Cases run in order; each makes its own erasure evidence (nonces are single use).
	tests := []struct {
		name   string
		req    func() *kbwire.DestroyRequest
		want   error
		reason string
	}{
		{"no commit acknowledgement", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{Erasure: erasure("source", good)}
		}, ErrUnproven, "commit acknowledgement"},
		{"acknowledgement under another key", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: forged, Erasure: erasure("source", good)}
		}, ErrUnproven, "does not verify"},
		{"acknowledgement of another transcript", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: tamperedAck, Erasure: erasure("source", good)}
		}, ErrUnproven, "does not verify"},
		{"acknowledgement of another migration", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: commitAck(t, other, otherRel), Erasure: erasure("source", good)}
		}, ErrUnproven, `acknowledges migration "m2"`},
		{"acknowledgement that is no JSON", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: []byte("commit-ack"), Erasure: erasure("source", good)}
		}, ErrUnproven, "commit acknowledgement"},
		{"no erasure evidence", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: ack}
		}, ErrUnproven, "no erasure evidence"},
		{"erasure the policy refuses", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: ack, Erasure: erasure("source", partial)}
		}, ErrUnproven, "did not zeroize key mdk"},
		{"erasure evidence from another chip", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: ack, Erasure: erasure("destination", good)}
		}, ErrEvidenceRejected, "erasure evidence from chip "},
		{"erasure evidence from another chip, unverified erasure asked", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{CommitAck: ack, Erasure: erasure("destination", good), UnverifiedErasure: true}
		}, ErrEvidenceRejected, "the source released was chip "},
		{"unverified erasure without an acknowledgement", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{UnverifiedErasure: true}
		}, ErrUnproven, "commit acknowledgement"},
		{"proof with an abort", func() *kbwire.DestroyRequest {
			return &kbwire.DestroyRequest{Ending: kbwire.Abort, CommitAck: ack}
		}, ErrInvalidRequest, "commit only"},
	}
	for _, tt := range tests {
		req := tt.req()
		req.MigrationID, req.Tenant, req.VM = "m1", "demo", "vm1"
		if req.Ending == "" {
			req.Ending = kbwire.Commit
		}
		_, err := e.kb.Destroy(t.Context(), req)
		if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.reason) {
			t.Errorf("%s: Destroy = %v, want %v saying %q", tt.name, err, tt.want, tt.reason)
			continue
		}
		ev := e.audit.last(t)
		if ev.Kind != EventDestroy || ev.Decision != DecisionDeny || ev.MigrationID != "m1" || ev.VM != "vm1" ||
			!slices.ContainsFunc(ev.Reasons, func(r string) bool { return strings.Contains(r, tt.reason) }) {
			t.Errorf("%s: audit event %+v, want a destroy denial saying %q", tt.name, ev, tt.reason)
		}
	}
	if t.Failed() {
		return
	}
	// Nothing moved: both epochs' keys and the migration key live, the migration is released.
	for _, k := range []string{"lethe-demo-vm1-e1", "lethe-demo-vm1-e2", "lethe-mig-m1", "lethe-mig-m2"} {
		if !e.transitKeyExists(k) {
			t.Errorf("a refused commit destroyed %s", k)
		}
	}
	if g := e.guest("vm1"); g.Epoch != 1 || g.Migration == nil || g.Migration.State != stateReleased {
		t.Fatalf("guest after refused commits: epoch %d, migration %+v", g.Epoch, g.Migration)
	}
	// The proven commit goes through.
	resp, err := e.kb.Destroy(t.Context(), e.commit(m, rel))
	if err != nil {
		t.Fatalf("proven commit: %v", err)
	}
	if r := e.verifyReceipt(resp.Receipt); r.Outcome != receipt.OutcomeErased {
		t.Errorf("outcome %s", r.Outcome)
	}
}

// TestCommitUnverifiedErasure: with its source lost, a commit whose acknowledgement verifies
// goes ahead without accepted erasure evidence, and its receipt says what was not proven.
func TestCommitUnverifiedErasure(t *testing.T) {
	partial, err := attest.ErasureStatement{MigrationID: "m1", KeysZeroized: []string{attest.KeyTransfer}}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		statement []byte // nil: no erasure evidence
		caveat    string
	}{
		"no erasure evidence":        {caveat: "the source sent no erasure evidence"},
		"erasure the policy refuses": {statement: partial, caveat: "does not satisfy the tenant's policy (erasure: source did not zeroize key mdk"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			m, _, rel := e.released("m1", "vm1")
			req := &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit, CommitAck: commitAck(t, m, rel), UnverifiedErasure: true}
			if tt.statement != nil {
				req.Erasure = &e.attest("source", "m1", attest.RoleErased, tt.statement).att
			}
			resp, err := e.kb.Destroy(t.Context(), req)
			if err != nil {
				t.Fatalf("Destroy: %v", err)
			}
			r := e.verifyReceipt(resp.Receipt)
			if r.Outcome != receipt.OutcomeCommittedUnverifiedErasure {
				t.Errorf("outcome %s, want %s", r.Outcome, receipt.OutcomeCommittedUnverifiedErasure)
			}
			if !slices.ContainsFunc(r.Caveats, func(c string) bool { return strings.Contains(c, tt.caveat) }) {
				t.Errorf("caveats %q do not say %q", r.Caveats, tt.caveat)
			}
			switch {
			case tt.statement == nil && r.Erasure != nil:
				t.Errorf("receipt quotes erasure evidence %+v that was not sent", r.Erasure)
			case tt.statement != nil && (r.Erasure == nil || r.Erasure.Accepted || r.Erasure.SameEnd(r.Source) != nil):
				t.Errorf("receipt erasure %+v, want the source's evidence, not accepted", r.Erasure)
			}
			// The commit happened: the source's keys are gone, the guest lives in epoch 2.
			if e.transitKeyExists("lethe-demo-vm1-e1") || e.transitKeyExists("lethe-mig-m1") {
				t.Errorf("keys left: %v", e.transitKeys())
			}
			if g := e.guest("vm1"); g.Epoch != 2 {
				t.Errorf("guest epoch %d, want 2", g.Epoch)
			}
			if ev := e.audit.last(t); ev.Decision != DecisionAllow || ev.Kind != EventDestroy {
				t.Errorf("audit event %+v", ev)
			}
		})
	}
}

// TestMigrationIDBoundToGuest: a request naming another guest's migration ID reaches neither
// that migration's keys nor its receipt.
func TestMigrationIDBoundToGuest(t *testing.T) {
	e := newEnv(t)
	m, _, rel := e.released("m1", "vm1")
	e.adopt("vm2")
	before := e.transitKeys()

	refused := func(name string, req *kbwire.DestroyRequest) {
		t.Helper()
		_, err := e.kb.Destroy(t.Context(), req)
		if !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "belongs to another guest") {
			t.Errorf("%s: Destroy = %v, want ErrInvalidRequest: belongs to another guest", name, err)
			return
		}
		if ev := e.audit.last(t); ev.Decision != DecisionDeny || ev.VM != req.VM || !strings.Contains(strings.Join(ev.Reasons, " "), "belongs to another guest") {
			t.Errorf("%s: audit event %+v", name, ev)
		}
	}
	// vm2 aborts vm1's live migration "before its release".
	refused("abort of another guest's migration", &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm2", Ending: kbwire.Abort})
	if diff := cmp.Diff(before, e.transitKeys()); diff != "" {
		t.Fatalf("another guest's abort changed the keys (-before +after):\n%s", diff)
	}
	if g := e.guest("vm2"); g.Migration != nil || g.Epoch != 1 {
		t.Errorf("vm2 after the refused abort: %+v", g)
	}

	first, err := e.kb.Destroy(t.Context(), e.commit(m, rel))
	if err != nil {
		t.Fatalf("commit of vm1's migration: %v", err)
	}
	// Once m1 has ended, vm2 does not get its receipt by asking to end it again.
	refused("commit naming another guest's ended migration", &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm2", Ending: kbwire.Commit})
	refused("abort naming another guest's ended migration", &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm2", Ending: kbwire.Abort})
	again, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit})
	if err != nil || !bytes.Equal(again.Receipt.Payload, first.Receipt.Payload) {
		t.Errorf("vm1's repeated commit: %v", err)
	}

	// A receipt stored under an ID with no owner recorded (written before IDs were bound) is
	// still returned only to its guest.
	if _, err := e.kb.recs.put(t.Context(), receiptPath("legacy"), &receiptRecord{Envelope: first.Receipt}, 0); err != nil {
		t.Fatal(err)
	}
	refused("abort naming a receipt of another guest", &kbwire.DestroyRequest{MigrationID: "legacy", Tenant: "demo", VM: "vm2", Ending: kbwire.Abort})
	if g := e.guest("vm2"); g.Migration != nil || g.Epoch != 1 {
		t.Errorf("vm2 after the refused abort: %+v", g)
	}
}

// TestAbortRequiresProof: an abort of a released migration destroys the destination's epoch
// key only with the destination's evidence that it erased and never resumed the guest, or,
// asked explicitly (the destination host is lost), with a receipt that says so.
func TestAbortRequiresProof(t *testing.T) {
	e := newEnv(t)
	e.released("m1", "vm1")
	_, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort})
	if !errors.Is(err, ErrUnproven) {
		t.Fatalf("abort without proof = %v, want ErrUnproven", err)
	}
	if !e.transitKeyExists("lethe-demo-vm1-e2") || !e.transitKeyExists("lethe-mig-m1") {
		t.Fatal("an unproven abort destroyed keys")
	}
	if ev := e.audit.last(t); ev.Kind != EventDestroy || ev.Decision != DecisionDeny {
		t.Errorf("audit %+v, want destroy/deny", ev)
	}
	// Evidence from the source's chip is not the destination's.
	wrong := e.attest("source", "m1", attest.RoleErased, keybrokertest.ErasureStatement(t, "m1"))
	_, err = e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort, Erasure: &wrong.att})
	if !errors.Is(err, ErrEvidenceRejected) || !strings.Contains(err.Error(), "the destination released was") {
		t.Fatalf("abort with the source's evidence = %v, want ErrEvidenceRejected naming the destination", err)
	}

	resp, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort, UnverifiedErasure: true})
	if err != nil {
		t.Fatalf("abort with an unverified erasure: %v", err)
	}
	r := e.verifyReceipt(resp.Receipt)
	if r.Outcome != receipt.OutcomeAbortedUnverifiedErasure || r.Erasure != nil {
		t.Errorf("outcome %s, erasure %+v; want %s without erasure evidence", r.Outcome, r.Erasure, receipt.OutcomeAbortedUnverifiedErasure)
	}
	if e.transitKeyExists("lethe-demo-vm1-e2") || !e.transitKeyExists("lethe-demo-vm1-e1") {
		t.Error("an unverified abort must destroy epoch 2 and keep epoch 1")
	}
}

// TestErasureBindsTheEndsKey: erasure evidence must bind the HPKE key the end attested with
// in the release, so that another machine with the same claims (a TDX FMSPC names a model, an
// SNP chip ID can be masked), or the other end of the migration, cannot stand in for it.
func TestErasureBindsTheEndsKey(t *testing.T) {
	e := newEnv(t)
	e.released("m1", "vm1")
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	n, err := e.kb.IssueNonce(t.Context(), kbwire.NonceRequest{MigrationID: "m1", Role: attest.RoleErased})
	if err != nil {
		t.Fatal(err)
	}
	// The destination's own platform and chip, another HPKE key: a look-alike machine.
	ev, err := attest.Produce(t.Context(), e.plats["destination"], attest.Binding{
		MigrationID: "m1", Role: attest.RoleErased, Nonce: n.Nonce, HPKEPublicKey: k.PublicKey(),
		Statement: keybrokertest.ErasureStatement(t, "m1"),
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort, Erasure: &kbwire.Attestation{Nonce: n.Nonce, Evidence: ev}})
	if !errors.Is(err, ErrEvidenceRejected) || !strings.Contains(err.Error(), "does not bind the HPKE key the destination was released to") {
		t.Fatalf("abort with a look-alike's evidence = %v, want ErrEvidenceRejected naming the HPKE key", err)
	}
	if !e.transitKeyExists("lethe-demo-vm1-e2") {
		t.Fatal("the look-alike's evidence destroyed the destination's key")
	}
	if _, err := e.kb.Destroy(t.Context(), e.abort("m1", "vm1")); err != nil {
		t.Fatalf("abort with the destination's own evidence: %v", err)
	}
}

// TestPreparedSigningKeyRefused: a receipt-signing key created by someone else, exportable,
// is never used: it would let them sign grants and receipts in the keybroker's name.
func TestPreparedSigningKeyRefused(t *testing.T) {
	e := newEnv(t)
	if _, err := e.admin.Logical().WriteWithContext(t.Context(), "transit/keys/"+ReceiptSigningKey, map[string]any{"type": "ed25519", "exportable": true}); err != nil {
		t.Fatal(err)
	}
	fresh, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fresh.PublicKey(t.Context()); !errors.Is(err, ErrUnsafeKey) {
		t.Fatalf("PublicKey with an exportable signing key = %v, want ErrUnsafeKey", err)
	}
}
