package keybroker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
)

func TestReissueAfterCommit(t *testing.T) {
	e := newEnv(t)
	m, _, rel := e.released("m1", "vm1")
	dstKeys, err := m.dst.key.Open("m1", attest.RoleDestination, rel.SealedDestination)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.Destroy(t.Context(), e.commit(m, rel)); err != nil {
		t.Fatal(err)
	}
	// The destination agent restarts: a new key pair, fresh evidence, the same MDK_2.
	a := e.attest("destination", "reissue-1", attest.RoleAdopt, keybrokertest.CleanStatement(t))
	resp, err := e.kb.Reissue(t.Context(), &kbwire.ReissueRequest{ReissueID: "reissue-1", Tenant: "demo", VM: "vm1", Policy: e.signedPolicy(1, nil), Agent: a.att})
	if err != nil {
		t.Fatalf("Reissue: %v", err)
	}
	got, err := a.key.Open("reissue-1", attest.RoleAdopt, resp.Sealed)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Epoch != 2 || got.Epoch != 2 || !bytes.Equal(got.MDK, dstKeys.MDK) {
		t.Errorf("reissued epoch %d, MDK equal %v; want epoch 2 and the destination's MDK", got.Epoch, bytes.Equal(got.MDK, dstKeys.MDK))
	}
	if ev := e.audit.last(t); ev.Kind != EventReissue || ev.Decision != DecisionAllow || ev.Epoch != 2 {
		t.Errorf("audit %+v", ev)
	}
}

// TestCommitWithUnacceptedErasure: erasure evidence the tenant's policy does not accept
// proves no erasure: the commit is refused, unless the caller declares the source lost, and
// then the receipt never says erased.
func TestCommitWithUnacceptedErasure(t *testing.T) {
	e := newEnv(t)
	m, _, rel := e.released("m1", "vm1")
	// The source says it zeroized the transfer key but not MDK_1.
	st, err := attest.ErasureStatement{MigrationID: "m1", KeysZeroized: []string{attest.KeyTransfer}}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	req := &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit, CommitAck: commitAck(t, m, rel)}
	req.Erasure = &e.attest("source", "m1", attest.RoleErased, st).att
	if _, err := e.kb.Destroy(t.Context(), req); !errors.Is(err, ErrUnproven) {
		t.Fatalf("Destroy = %v, want ErrUnproven", err)
	}
	if !e.transitKeyExists("lethe-demo-vm1-e1") {
		t.Fatalf("a refused commit destroyed the epoch-1 key")
	}

	req.Erasure, req.UnverifiedErasure = &e.attest("source", "m1", attest.RoleErased, st).att, true
	resp, err := e.kb.Destroy(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	r := e.verifyReceipt(resp.Receipt)
	if r.Erasure == nil || r.Erasure.Accepted || !strings.Contains(strings.Join(r.Erasure.Reasons, " "), "mdk") {
		t.Errorf("receipt erasure %+v, want not accepted for the MDK", r.Erasure)
	}
	// The keys are destroyed all the same: the commit happened.
	if e.transitKeyExists("lethe-demo-vm1-e1") {
		t.Errorf("epoch-1 key left")
	}
	if r.Outcome != receipt.OutcomeCommittedUnverifiedErasure {
		t.Errorf("outcome %s", r.Outcome)
	}
}

func TestSlogAudit(t *testing.T) {
	var buf bytes.Buffer
	SlogAudit{Logger: slog.New(slog.NewJSONHandler(&buf, nil))}.Audit(context.Background(), Event{
		Kind: EventRelease, MigrationID: "m1", Tenant: "demo", VM: "vm1", Host: "host-b", Decision: DecisionDeny,
		Reasons: []string{"destinationTcbAtLeastSource: microcode"}, SourceEvidence: []byte{1, 2}, PolicyDigest: []byte{3}, PolicySVN: 4,
	})
	for _, want := range []string{`"event":"release"`, `"decision":"deny"`, `"source_evidence":"0102"`, `"policy_digest":"03"`, `"policy_svn":4`, `"host":"host-b"`, `"level":"WARN"`, `microcode`} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("audit record %s lacks %s", buf.String(), want)
		}
	}
}

func TestErrorCode(t *testing.T) {
	tests := map[string]struct {
		err  error
		want string
	}{
		"nil":        {nil, ""},
		"pending":    {fmt.Errorf("x: %w (y): %w", ErrDestructionPending, ErrVaultUnavailable), "destruction_pending"},
		"vault":      {fmt.Errorf("x: %w", ErrVaultUnavailable), "unavailable"},
		"nonce used": {fmt.Errorf("x: %w", ErrNonceUsed), "nonce_used"},
		"denied":     {fmt.Errorf("x: %w", ErrDenied), "denied"},
		"unproven":   {fmt.Errorf("x: %w: %w", ErrUnproven, grant.ErrCommitAck), "unproven"},
		"other":      {fmt.Errorf("boom"), "internal"},
	}
	got, want := map[string]string{}, map[string]string{}
	for name, tt := range tests {
		got[name], want[name] = ErrorCode(tt.err), tt.want
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("codes (-want +got):\n%s", diff)
	}
}

func TestConcurrentReleasesOfOneGuest(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	signed := e.signedPolicy(1, nil)
	ms := []*migration{e.newMigration("ma", "vm1", "destination", signed), e.newMigration("mb", "vm1", "destination", signed)}
	resps := make([]*kbwire.ReleaseResponse, len(ms))
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() { resps[i], errs[i] = e.kb.Release(t.Context(), m.req) })
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if won >= 0 {
				t.Fatalf("both releases of one guest succeeded")
			}
			won = i
		case !errors.Is(err, ErrGuestBusy):
			t.Fatalf("release %s: %v, want success or ErrGuestBusy", ms[i].req.MigrationID, err)
		}
	}
	if won < 0 {
		t.Fatalf("neither release succeeded: %v", errs)
	}
	// The winner's keys survive the loser's cleanup.
	keys, err := ms[won].dst.key.Open(ms[won].req.MigrationID, attest.RoleDestination, resps[won].SealedDestination)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := e.kb.keys.decrypt(t.Context(), "lethe-demo-vm1-e2", resps[won].WrappedMDK)
	if err != nil || !bytes.Equal(pt, keys.MDK) {
		t.Fatalf("the winner's MDK_2 no longer unwraps: %v", err)
	}
	if !e.transitKeyExists(migrationKeyName(ms[won].req.MigrationID)) || e.transitKeyExists(migrationKeyName(ms[1-won].req.MigrationID)) {
		t.Errorf("migration keys after the race: %v", e.transitKeys())
	}
}
