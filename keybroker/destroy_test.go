package keybroker

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
)

// released adopts vm and releases migration id for it.
func (e *env) released(id, vm string) (*migration, *AdoptResponse, *ReleaseResponse) {
	e.t.Helper()
	ad := e.adopt(vm)
	m := e.newMigration(id, vm, "destination", e.signedPolicy(1, nil))
	resp, err := e.kb.Release(e.t.Context(), m.req)
	if err != nil {
		e.t.Fatalf("Release: %v", err)
	}
	return m, ad, resp
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
	erased := e.attest("source", "m1", attest.RoleErased, keybrokertest.ErasureStatement(t, "m1"))

	resp, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Commit, Erasure: &erased.att})
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

	srcD, dstD, erD := m.req.Source.Evidence.Digest(), m.req.Destination.Evidence.Digest(), erased.att.Evidence.Digest()
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
		t.Errorf("receipt erasure %+v", r.Erasure)
	}
	if string(r.CleanMemory) != string(keybrokertest.CleanStatement(t)) {
		t.Errorf("receipt clean-memory statement %s", r.CleanMemory)
	}
	if r.Policy.SVN != 1 || string(r.Policy.Digest) != string(rel.PolicyDigest) {
		t.Errorf("receipt policy %+v", r.Policy)
	}

	// Idempotent: the same ending again returns the same receipt.
	again, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Commit})
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
	resp, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Abort})
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
	e.released("m1", "vm1")
	if _, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Commit}); err != nil {
		t.Fatal(err)
	}
	_, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Abort})
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
	e.released("m1", "vm1")
	if _, err := e.kb.PublicKey(t.Context()); err != nil {
		t.Fatal(err)
	}

	e.proxy.Cut()
	_, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Commit})
	if !errors.Is(err, ErrDestructionPending) || !errors.Is(err, ErrVaultUnavailable) {
		t.Fatalf("Destroy with Vault down = %v, want ErrDestructionPending", err)
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
	resp, err := e.kb.Destroy(t.Context(), &DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: Abort})
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
