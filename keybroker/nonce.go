package keybroker

import (
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// Nonce errors, returned (wrapped) by IssueNonce, Release, Adopt and Destroy.
var (
	// ErrNonceUnknown: no nonce was issued for that migration and role by this keybroker, or
	// the one presented is not the one issued.
	ErrNonceUnknown = errors.New("nonce unknown")
	// ErrNonceExpired: the nonce's TTL has passed.
	ErrNonceExpired = errors.New("nonce expired")
	// ErrNonceUsed: the nonce was already consumed (a replay).
	ErrNonceUsed = errors.New("nonce already used")
	// ErrNonceStoreFull: the bounded nonce store holds MaxNonces live nonces.
	ErrNonceStoreFull = errors.New("nonce store full")
)

type nonceKey struct {
	migration string
	role      attest.Role
}

type nonceEntry struct {
	nonce   []byte
	expires time.Time
	used    bool
}

// nonceStore holds issued nonces per (migration, role): single use, with a TTL, bounded.
// A consumed nonce stays as a tombstone until it expires, so that a replay is named as such.
type nonceStore struct {
	now func() time.Time
	ttl time.Duration
	max int

	mu      sync.Mutex
	entries map[nonceKey]*nonceEntry
}

func newNonceStore(now func() time.Time, ttl time.Duration, max int) *nonceStore {
	return &nonceStore{now: now, ttl: ttl, max: max, entries: map[nonceKey]*nonceEntry{}}
}

// issue returns a fresh nonce for (migration, role), replacing any earlier one.
func (s *nonceStore) issue(migration string, role attest.Role) ([]byte, time.Time, error) {
	n := make([]byte, attest.NonceSize)
	rand.Read(n)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	k := nonceKey{migration, role}
	if _, ok := s.entries[k]; !ok && len(s.entries) >= s.max {
		s.sweepLocked(now)
		if len(s.entries) >= s.max {
			return nil, time.Time{}, fmt.Errorf("issuing nonce: %d live nonces: %w", len(s.entries), ErrNonceStoreFull)
		}
	}
	e := &nonceEntry{nonce: n, expires: now.Add(s.ttl)}
	s.entries[k] = e
	return append([]byte(nil), n...), e.expires, nil
}

// consume checks nonce against the one issued for (migration, role) and marks it used.
func (s *nonceStore) consume(migration string, role attest.Role, nonce []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[nonceKey{migration, role}]
	if !ok || subtle.ConstantTimeCompare(e.nonce, nonce) != 1 {
		return fmt.Errorf("%s nonce of migration %s: %w", role, migration, ErrNonceUnknown)
	}
	if e.used {
		return fmt.Errorf("%s nonce of migration %s: %w", role, migration, ErrNonceUsed)
	}
	if !s.now().Before(e.expires) {
		return fmt.Errorf("%s nonce of migration %s: %w", role, migration, ErrNonceExpired)
	}
	e.used = true
	return nil
}

// sweepLocked forgets expired entries.
func (s *nonceStore) sweepLocked(now time.Time) {
	for k, e := range s.entries {
		if !now.Before(e.expires) {
			delete(s.entries, k)
		}
	}
}

// sweep forgets expired entries.
func (s *nonceStore) sweep() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweepLocked(s.now())
}
