package keybroker

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// second returns another keybroker on e's Vault (through e's proxy), with e's clock and audit
// sink and its own journal: a second instance of the queue group.
func (e *env) second() *Keybroker {
	e.t.Helper()
	c, err := vaulttest.NewClient(e.proxy.Addr, e.vault.Token)
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := e.cfg
	cfg.Vault, cfg.StateDir = c, e.t.TempDir()
	kb, err := New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(kb.rlog.waitIdle)
	return kb
}

// TestNoncesAcrossKeybrokers: two keybrokers on one Vault accept each other's nonces, once,
// until they expire, and refuse a release when Vault cannot record a nonce's use.
func TestNoncesAcrossKeybrokers(t *testing.T) {
	e := newEnv(t)
	a, b := e.kb, e.second()
	ctx := t.Context()

	// Both create the nonce key at once: one wins, both use it.
	var wg sync.WaitGroup
	var errA, errB error
	wg.Go(func() { errA = a.loadNonceKey(ctx) })
	wg.Go(func() { errB = b.loadNonceKey(ctx) })
	wg.Wait()
	if err := errors.Join(errA, errB); err != nil {
		t.Fatalf("loading the nonce key: %v", err)
	}
	if !bytes.Equal(a.nonces.key, b.nonces.key) {
		t.Fatal("the two keybrokers loaded different nonce keys")
	}

	e.adopt("vm1") // nonce from a, adoption on a
	e.adopt("vm2")

	t.Run("issued by one, consumed by the other", func(t *testing.T) {
		m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil)) // nonces from a
		if _, err := b.Release(ctx, m.req); err != nil {
			t.Fatalf("Release on the other keybroker: %v", err)
		}
		for name, kb := range map[string]*Keybroker{"issuer": a, "consumer": b} {
			if _, err := kb.Release(ctx, m.req); !errors.Is(err, ErrNonceUsed) {
				t.Errorf("replay on the %s = %v, want ErrNonceUsed", name, err)
			}
		}
	})

	t.Run("racing consumers", func(t *testing.T) {
		n, err := a.IssueNonce(ctx, kbwire.NonceRequest{MigrationID: "m2", Role: attest.RoleSource})
		if err != nil {
			t.Fatal(err)
		}
		errs := make([]error, 16)
		var wg sync.WaitGroup
		for i := range errs {
			kb := []*Keybroker{a, b}[i%2]
			wg.Go(func() { errs[i] = kb.consumeNonce(ctx, "m2", attest.RoleSource, n.Nonce) })
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, ErrNonceUsed):
				t.Errorf("a loser got %v, want ErrNonceUsed", err)
			}
		}
		if won != 1 {
			t.Errorf("%d consumers won, want 1", won)
		}
	})

	t.Run("racing adoptions", func(t *testing.T) {
		ag := e.attest("source", "adopt-vm3", attest.RoleAdopt, keybrokertest.CleanStatement(t))
		req := &kbwire.AdoptRequest{AdoptionID: "adopt-vm3", Tenant: "demo", VM: "vm3", Policy: e.signedPolicy(1, nil), Agent: ag.att}
		var errs [2]error
		var wg sync.WaitGroup
		for i, kb := range []*Keybroker{a, b} {
			wg.Go(func() { _, errs[i] = kb.Adopt(ctx, req) })
		}
		wg.Wait()
		if (errs[0] == nil) == (errs[1] == nil) {
			t.Fatalf("adoptions = %v, %v; want exactly one to succeed", errs[0], errs[1])
		}
		if loser := errors.Join(errs[0], errs[1]); !errors.Is(loser, ErrNonceUsed) {
			t.Errorf("the losing adoption = %v, want ErrNonceUsed", loser)
		}
	})

	t.Run("expired", func(t *testing.T) {
		m := e.newMigration("m3", "vm2", "destination", e.signedPolicy(1, nil))
		e.clock.Advance(61 * time.Second)
		if _, err := b.Release(ctx, m.req); !errors.Is(err, ErrNonceExpired) {
			t.Fatalf("Release after the TTL on the other keybroker = %v, want ErrNonceExpired", err)
		}
	})

	t.Run("vault down", func(t *testing.T) {
		before := e.transitKeys()
		e.proxy.Cut()
		// Issuing asks Vault nothing once the key is loaded; consuming must.
		m := e.newMigration("m4", "vm2", "destination", e.signedPolicy(1, nil))
		_, err := b.Release(ctx, m.req)
		e.proxy.Restore()
		if !errors.Is(err, ErrVaultUnavailable) || ErrorCode(err) != "unavailable" {
			t.Fatalf("Release with Vault down = %v, want ErrVaultUnavailable", err)
		}
		if ev := e.audit.last(t); ev.Decision != DecisionError {
			t.Errorf("audited as %q, want error", ev.Decision)
		}
		if diff := cmp.Diff(before, e.transitKeys()); diff != "" {
			t.Errorf("a release refused for want of Vault changed its keys (-before +after):\n%s", diff)
		}
		if g := e.guest("vm2"); g.Migration != nil || g.Epoch != 1 {
			t.Errorf("guest record after the refused release: %+v", g)
		}
	})

	t.Run("sweep", func(t *testing.T) {
		marks := func() int {
			t.Helper()
			n := 0
			buckets, err := a.recs.list(ctx, nonceMarksDir)
			if err != nil {
				t.Fatal(err)
			}
			for _, bk := range buckets {
				ms, err := a.recs.list(ctx, nonceMarksDir+bk)
				if err != nil {
					t.Fatal(err)
				}
				n += len(ms)
			}
			return n
		}
		n, err := a.IssueNonce(ctx, kbwire.NonceRequest{MigrationID: "m5", Role: attest.RoleSource})
		if err != nil {
			t.Fatal(err)
		}
		if err := b.consumeNonce(ctx, "m5", attest.RoleSource, n.Nonce); err != nil {
			t.Fatal(err)
		}
		var got []int
		for _, step := range []time.Duration{0, time.Minute, 3 * time.Minute} {
			e.clock.Advance(step)
			if err := b.nonces.sweep(ctx); err != nil {
				t.Fatal(err)
			}
			got = append(got, marks())
		}
		// Until it expires and after, the mark of m5's nonce stays; once the skew and its
		// bucket have passed, every mark is gone.
		if got[0] == 0 || got[1] == 0 || got[2] != 0 {
			t.Errorf("marks after the sweeps: %v, want some, some, none", got)
		}
		if err := a.consumeNonce(ctx, "m5", attest.RoleSource, n.Nonce); !errors.Is(err, ErrNonceExpired) {
			t.Errorf("the swept nonce again = %v, want ErrNonceExpired", err)
		}
	})
}
