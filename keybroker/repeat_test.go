package keybroker

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
)

// openBoth opens a release's sealed keys with the migration's agents' keys.
func openBoth(t *testing.T, m *migration, resp *kbwire.ReleaseResponse) (tk, mdk []byte) {
	t.Helper()
	src, err := m.src.key.Open(m.req.MigrationID, attest.RoleSource, resp.SealedSource)
	if err != nil {
		t.Fatalf("opening the source's keys: %v", err)
	}
	dst, err := m.dst.key.Open(m.req.MigrationID, attest.RoleDestination, resp.SealedDestination)
	if err != nil {
		t.Fatalf("opening the destination's keys: %v", err)
	}
	if !bytes.Equal(src.TK, dst.TK) {
		t.Fatalf("source and destination got different transfer keys")
	}
	return dst.TK, dst.MDK
}

// TestRepeatedRelease: the broker reruns its attestation after a crash, with new nonces,
// evidence and HPKE keys, and asks for the same migration's keys again.
func TestRepeatedRelease(t *testing.T) {
	e := newEnv(t)
	first, _, rel1 := e.released("m1", "vm1")
	tk1, mdk1 := openBoth(t, first, rel1)

	again := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	rel2, err := e.kb.Release(t.Context(), again.req)
	if err != nil {
		t.Fatalf("repeated Release: %v", err)
	}
	type epochs struct {
		From, To uint64
		Wrapped  string
	}
	if diff := cmp.Diff(epochs{rel1.FromEpoch, rel1.ToEpoch, rel1.WrappedMDK}, epochs{rel2.FromEpoch, rel2.ToEpoch, rel2.WrappedMDK}); diff != "" {
		t.Errorf("repeated release (-first +repeat):\n%s", diff)
	}
	tk2, mdk2 := openBoth(t, again, rel2)
	if !bytes.Equal(tk1, tk2) || !bytes.Equal(mdk1, mdk2) {
		t.Errorf("the repeated release sealed other keys than the first")
	}
	if _, err := first.src.key.Open("m1", attest.RoleSource, rel2.SealedSource); err == nil {
		t.Errorf("the first release's key opens the repeated release's keys")
	}
	if got := e.transitKeys(); len(got) != 5 { // e1, e2, mig-m1, the nonce key's wrapping key and the signing key
		t.Errorf("transit keys after a repeated release: %v", got)
	}
	if ev := e.audit.last(t); ev.Kind != EventRelease || ev.Decision != DecisionAllow || ev.Epoch != 2 {
		t.Errorf("audit event of the repeated release: %+v", ev)
	}

	// A repeat is judged like a first release: another destination host, a replayed nonce
	// or a destination the policy refuses gets nothing.
	// The cases run in order: the last replays the one before.
	var weak *migration
	for _, tt := range []struct {
		name string
		req  func() *kbwire.ReleaseRequest
		want error
	}{
		{"other host", func() *kbwire.ReleaseRequest {
			m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
			m.req.DestinationHost.Name = "host-c"
			return m.req
		}, ErrGuestBusy},
		{"denied", func() *kbwire.ReleaseRequest {
			weak = e.newMigration("m1", "vm1", "weak", e.signedPolicy(1, nil))
			return weak.req
		}, ErrDenied},
		{"replayed nonces", func() *kbwire.ReleaseRequest { return weak.req }, ErrNonceUsed},
	} {
		if _, err := e.kb.Release(t.Context(), tt.req()); !errors.Is(err, tt.want) {
			t.Errorf("%s: Release = %v, want %v", tt.name, err, tt.want)
		}
	}

	// The receipt quotes the ends that hold the keys: the repeated release's.
	resp, err := e.kb.Destroy(t.Context(), e.commit(again, rel2))
	if err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	r := e.verifyReceipt(resp.Receipt)
	srcD, dstD := again.req.Source.Evidence.Digest(), again.req.Destination.Evidence.Digest()
	if !bytes.Equal(r.Source.EvidenceDigest, srcD[:]) || !bytes.Equal(r.Destination.EvidenceDigest, dstD[:]) {
		t.Errorf("receipt evidence digests are not the repeated release's")
	}

	// Once ended, the migration is not released again.
	late := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), late.req); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("Release after the end = %v, want ErrInvalidRequest", err)
	}
}

func TestRepeatedDestroy(t *testing.T) {
	for _, ending := range []kbwire.Ending{kbwire.Commit, kbwire.Abort} {
		t.Run(string(ending), func(t *testing.T) {
			e := newEnv(t)
			m, _, rel := e.released("m1", "vm1")
			req := e.abort("m1", "vm1")
			if ending == kbwire.Commit {
				req = e.commit(m, rel)
			}
			first, err := e.kb.Destroy(t.Context(), req)
			if err != nil {
				t.Fatalf("Destroy: %v", err)
			}
			// The broker reruns its step: the same request again (its erasure nonce is spent,
			// its proof is not looked at again), then once more with fresh erasure evidence
			// (commit) — the same receipt every time.
			again, err := e.kb.Destroy(t.Context(), req)
			if err != nil {
				t.Fatalf("repeated Destroy: %v", err)
			}
			if diff := cmp.Diff(first.Receipt, again.Receipt); diff != "" {
				t.Errorf("repeated Destroy receipt (-first +repeat):\n%s", diff)
			}
			if ending == kbwire.Commit {
				erased := e.attest("source", "m1", attest.RoleErased, keybrokertest.ErasureStatement(t, "m1"))
				third, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit, Erasure: &erased.att})
				if err != nil {
					t.Fatalf("repeated Destroy with erasure evidence: %v", err)
				}
				if diff := cmp.Diff(first.Receipt, third.Receipt); diff != "" {
					t.Errorf("repeated Destroy receipt (-first +repeat):\n%s", diff)
				}
				r := e.verifyReceipt(first.Receipt)
				d := sha256.Sum256(req.CommitAck)
				if !bytes.Equal(r.CommitAckDigest, d[:]) {
					t.Errorf("receipt commit ack digest %x, want %x", r.CommitAckDigest, d)
				}
			}
			got, err := e.kb.Receipt(t.Context(), "m1")
			if err != nil {
				t.Fatalf("Receipt: %v", err)
			}
			if diff := cmp.Diff(first.Receipt, got); diff != "" {
				t.Errorf("Receipt (-Destroy +Receipt):\n%s", diff)
			}
		})
	}
}

// TestAbortBeforeRelease: the broker aborts a migration the keybroker never released (a
// denial, a timeout while attesting); the abort still ends with a receipt.
func TestAbortBeforeRelease(t *testing.T) {
	e := newEnv(t)
	adopted := e.adopt("vm1")
	weak := e.newMigration("m1", "vm1", "weak", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), weak.req); !errors.Is(err, ErrDenied) {
		t.Fatalf("Release to a weak destination = %v, want ErrDenied", err)
	}
	abort := &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort}
	resp, err := e.kb.Destroy(t.Context(), abort)
	if err != nil {
		t.Fatalf("Destroy(abort) before release: %v", err)
	}
	r := e.verifyReceipt(resp.Receipt)
	type summary struct {
		Outcome  receipt.Outcome
		From, To uint64
		Keys     []string
		Versions []int
	}
	got := summary{Outcome: r.Outcome, From: r.FromEpoch, To: r.ToEpoch, Keys: keyNames(r.DestroyedKeys)}
	for _, k := range r.DestroyedKeys {
		got.Versions = append(got.Versions, k.LatestVersion)
	}
	want := summary{Outcome: receipt.OutcomeAborted, From: 1, To: 2, Keys: []string{"lethe-mig-m1", "lethe-demo-vm1-e2"}, Versions: []int{0, 0}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("abort receipt (-want +got):\n%s", diff)
	}
	if !strings.Contains(strings.Join(r.Caveats, "\n"), "before the keybroker released any key") {
		t.Errorf("caveats %q do not say nothing was released", r.Caveats)
	}
	if g := e.guest("vm1"); g.Epoch != 1 || g.WrappedMDK != adopted.WrappedMDK || g.Migration != nil {
		t.Errorf("guest after the abort: %+v", g)
	}

	again, err := e.kb.Destroy(t.Context(), abort)
	if err != nil || !bytes.Equal(again.Receipt.Payload, resp.Receipt.Payload) {
		t.Errorf("repeated abort: %v", err)
	}
	if _, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit}); !errors.Is(err, ErrBothEpochs) {
		t.Errorf("commit after the abort = %v, want ErrBothEpochs", err)
	}
	late := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), late.req); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("Release after the abort = %v, want ErrInvalidRequest", err)
	}
	// A commit of a migration never released stays unknown.
	if _, err := e.kb.Destroy(t.Context(), &kbwire.DestroyRequest{MigrationID: "m2", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit}); !errors.Is(err, ErrUnknownMigration) {
		t.Errorf("commit of an unknown migration = %v, want ErrUnknownMigration", err)
	}
}

// TestReleaseTransportTerms checks the release response carries the policy's transport terms
// the broker passes on to the transfer (zero-page elision and the downtime limit), and that
// the signed grant the agents act on states them, with post-copy: a broker cannot loosen them.
func TestReleaseTransportTerms(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	e.adopt("vm2")
	allow := e.signedPolicy(2, func(y string) string {
		return strings.Replace(y, "  erasure:\n", "  transport:\n    allowZeroPageElision: true\n    maxDowntime: 150ms\n    allowPostCopy: true\n  erasure:\n", 1)
	})
	// In order: the second policy's svn 2 becomes the last accepted.
	for _, tt := range []struct {
		name     string
		vm       string
		signed   []byte
		want     bool
		downtime time.Duration
	}{
		{"default", "vm1", e.signedPolicy(1, nil), false, 0},
		{"allowed", "vm2", allow, true, 150 * time.Millisecond},
	} {
		name := tt.name
		m := e.newMigration("m-"+tt.vm, tt.vm, "destination", tt.signed)
		resp, err := e.kb.Release(t.Context(), m.req)
		if err != nil {
			t.Fatalf("%s: Release: %v", name, err)
		}
		if resp.ZeroPageElision != tt.want {
			t.Errorf("%s: ZeroPageElision = %v, want %v", name, resp.ZeroPageElision, tt.want)
		}
		if resp.MaxDowntime != tt.downtime {
			t.Errorf("%s: MaxDowntime = %v, want %v", name, resp.MaxDowntime, tt.downtime)
		}
		g, err := grant.Parse(resp.Grant)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := (terms{g.ZeroPageElision, g.MaxDowntime, g.PostCopy}); got != (terms{tt.want, tt.downtime, tt.want}) {
			t.Errorf("%s: the grant states %+v, want %+v", name, got, terms{tt.want, tt.downtime, tt.want})
		}
	}
}

// terms are a grant's transport terms.
type terms struct {
	zeroPages bool
	downtime  time.Duration
	postCopy  bool
}
