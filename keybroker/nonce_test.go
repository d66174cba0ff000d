package keybroker

import (
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

func TestNonceStore(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newNonceStore(time.Now, time.Minute, 2)
		n, exp, err := s.issue("m1", attest.RoleSource)
		if err != nil {
			t.Fatal(err)
		}
		if len(n) != attest.NonceSize || !exp.Equal(time.Now().Add(time.Minute)) {
			t.Fatalf("nonce of %d bytes expiring %v", len(n), exp)
		}
		if err := s.consume("m1", attest.RoleDestination, n); !errors.Is(err, ErrNonceUnknown) {
			t.Errorf("another role: %v, want ErrNonceUnknown", err)
		}
		if err := s.consume("m1", attest.RoleSource, n); err != nil {
			t.Fatal(err)
		}
		if err := s.consume("m1", attest.RoleSource, n); !errors.Is(err, ErrNonceUsed) {
			t.Errorf("replay: %v, want ErrNonceUsed", err)
		}

		n2, _, _ := s.issue("m2", attest.RoleSource)
		time.Sleep(time.Minute) // a fake clock inside the bubble
		if err := s.consume("m2", attest.RoleSource, n2); !errors.Is(err, ErrNonceExpired) {
			t.Errorf("after the TTL: %v, want ErrNonceExpired", err)
		}

		// Bounded: a full store of live nonces refuses more; expired ones make room.
		s.issue("m3", attest.RoleSource)
		s.issue("m4", attest.RoleSource)
		if _, _, err := s.issue("m5", attest.RoleSource); !errors.Is(err, ErrNonceStoreFull) {
			t.Errorf("third live nonce in a store of 2: %v, want ErrNonceStoreFull", err)
		}
		time.Sleep(time.Minute)
		if _, _, err := s.issue("m5", attest.RoleSource); err != nil {
			t.Errorf("after expiry: %v", err)
		}
	})
}
