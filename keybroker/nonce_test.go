package keybroker

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
)

// memNonces is an in-memory nonceVault, for the nonce logic's unit tests; the Vault one is
// tested on a real Vault (multi_test.go).
type memNonces struct {
	key   []byte
	mu    sync.Mutex
	marks map[string]time.Time
}

func newMemNonces() *memNonces {
	return &memNonces{key: make([]byte, 32), marks: map[string]time.Time{}}
}

func (m *memNonces) nonceKey(context.Context) ([]byte, error) { return m.key, nil }

func (m *memNonces) markUsed(_ context.Context, name string, expires time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.marks[name]; ok {
		return errConflict
	}
	m.marks[name] = expires
	return nil
}

func (m *memNonces) sweepUsed(_ context.Context, before time.Time) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for k, exp := range m.marks {
		if !exp.After(before) {
			delete(m.marks, k)
			n++
		}
	}
	return n, nil
}

func (m *memNonces) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.marks)
}

func TestNonceStore(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := t.Context()
		v := newMemNonces()
		// Two keybrokers sharing one Vault.
		a := newNonceStore(time.Now, time.Minute, 2, v)
		b := newNonceStore(time.Now, time.Minute, 2, v)
		n, exp, err := a.issue(ctx, "m1", attest.RoleSource)
		if err != nil {
			t.Fatal(err)
		}
		if len(n) != attest.NonceSize || !exp.Equal(time.Now().Add(time.Minute)) {
			t.Fatalf("nonce of %d bytes expiring %v", len(n), exp)
		}
		tampered := func(i int) []byte {
			c := append([]byte(nil), n...)
			c[i] ^= 1
			return c
		}
		refused := map[string]error{
			"another role":      b.consume(ctx, "m1", attest.RoleDestination, n),
			"another migration": b.consume(ctx, "m2", attest.RoleSource, n),
			"random altered":    b.consume(ctx, "m1", attest.RoleSource, tampered(0)),
			"expiry altered":    b.consume(ctx, "m1", attest.RoleSource, tampered(nonceRandomSize+nonceExpirySize-1)),
			"tag altered":       b.consume(ctx, "m1", attest.RoleSource, tampered(attest.NonceSize-1)),
			"short":             b.consume(ctx, "m1", attest.RoleSource, n[:16]),
		}
		for name, err := range refused {
			if !errors.Is(err, ErrNonceUnknown) {
				t.Errorf("%s: %v, want ErrNonceUnknown", name, err)
			}
		}
		if v.count() != 0 {
			t.Errorf("refused nonces left %d marks", v.count())
		}
		// Issued by a, consumed by b; then used for both.
		if err := b.consume(ctx, "m1", attest.RoleSource, n); err != nil {
			t.Fatal(err)
		}
		for name, s := range map[string]*nonceStore{"issuer": a, "consumer": b} {
			if err := s.consume(ctx, "m1", attest.RoleSource, n); !errors.Is(err, ErrNonceUsed) {
				t.Errorf("replay on the %s: %v, want ErrNonceUsed", name, err)
			}
		}

		n2, _, _ := a.issue(ctx, "m2", attest.RoleSource)
		time.Sleep(time.Minute) // a fake clock inside the bubble
		if err := b.consume(ctx, "m2", attest.RoleSource, n2); !errors.Is(err, ErrNonceExpired) {
			t.Errorf("after the TTL: %v, want ErrNonceExpired", err)
		}

		// A keybroker with a longer TTL (or a forger with the key) cannot make nonces that
		// outlive their marks.
		long := newNonceStore(time.Now, time.Hour, 2, v)
		n3, _, _ := long.issue(ctx, "m3", attest.RoleSource)
		if err := b.consume(ctx, "m3", attest.RoleSource, n3); !errors.Is(err, ErrNonceUnknown) {
			t.Errorf("expiring in an hour: %v, want ErrNonceUnknown", err)
		}

		// Bounded: a keybroker with 2 live nonces refuses more; expired ones make room.
		a.issue(ctx, "m4", attest.RoleSource)
		a.issue(ctx, "m5", attest.RoleSource)
		if _, _, err := a.issue(ctx, "m6", attest.RoleSource); !errors.Is(err, ErrNonceStoreFull) {
			t.Errorf("third live nonce of a keybroker with 2: %v, want ErrNonceStoreFull", err)
		}
		if _, _, err := b.issue(ctx, "m6", attest.RoleSource); err != nil {
			t.Errorf("another keybroker: %v", err)
		}
		time.Sleep(time.Minute)
		if _, _, err := a.issue(ctx, "m6", attest.RoleSource); err != nil {
			t.Errorf("after expiry: %v", err)
		}
	})
}

// TestNonceSweep: a used nonce's mark stays until the nonce has been expired for the
// tolerated clock skew, so that no keybroker accepts it again in between.
func TestNonceSweep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := t.Context()
		v := newMemNonces()
		s := newNonceStore(time.Now, time.Minute, 8, v)
		n, _, _ := s.issue(ctx, "m1", attest.RoleSource)
		if err := s.consume(ctx, "m1", attest.RoleSource, n); err != nil {
			t.Fatal(err)
		}
		var got []int
		for range 3 {
			if err := s.sweep(ctx); err != nil {
				t.Fatal(err)
			}
			got = append(got, v.count())
			time.Sleep(time.Minute)
		}
		// Now, at expiry, after the skew.
		if diff := cmp.Diff([]int{1, 1, 0}, got); diff != "" {
			t.Errorf("marks after each sweep (-want +got):\n%s", diff)
		}
	})
}

// TestNonceRace: of many consumers of one nonce, on two keybrokers, exactly one wins.
func TestNonceRace(t *testing.T) {
	v := newMemNonces()
	a := newNonceStore(time.Now, time.Minute, 8, v)
	b := newNonceStore(time.Now, time.Minute, 8, v)
	n, _, err := a.issue(t.Context(), "m1", attest.RoleDestination)
	if err != nil {
		t.Fatal(err)
	}
	errs := make([]error, 32)
	var wg sync.WaitGroup
	for i := range errs {
		s := []*nonceStore{a, b}[i%2]
		wg.Go(func() { errs[i] = s.consume(t.Context(), "m1", attest.RoleDestination, n) })
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
}
