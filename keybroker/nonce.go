package keybroker

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// Nonce errors, returned (wrapped) by IssueNonce, Release, Adopt, Reissue and Destroy.
var (
	// ErrNonceUnknown: the nonce was not issued for that migration and role by a keybroker
	// sharing this one's Vault, or it was altered.
	ErrNonceUnknown = errors.New("nonce unknown")
	// ErrNonceExpired: the nonce's TTL has passed.
	ErrNonceExpired = errors.New("nonce expired")
	// ErrNonceUsed: the nonce was already consumed, by this keybroker or another (a replay).
	ErrNonceUsed = errors.New("nonce already used")
	// ErrNonceStoreFull: this keybroker has issued MaxNonces nonces that are still live.
	ErrNonceStoreFull = errors.New("nonce store full")
)

// A nonce is self-authenticating, so that any keybroker of the queue group can check one that
// another issued without asking Vault:
//
//	nonce = random [16] ‖ expiry [6] ‖ tag [10]
//	expiry = Unix milliseconds, big endian
//	tag = HMAC-SHA256(nonce key, "lethe/v1/nonce" ‖ len ‖ migration ‖ len ‖ role ‖ random ‖ expiry)[:10]
//
// The nonce key (32 bytes) is shared by every keybroker on the same Vault: it is drawn once
// from Transit (datakey under NonceWrappingKey) and kept wrapped in KV at config/nonce-key,
// written with check-and-set 0 so that the first keybroker's key is everyone's.
//
// Single use is Vault's: consuming a nonce writes a mark at nonces/<bucket>/<SHA-256 of the
// nonce> with check-and-set 0, a write that exactly one consumer wins. Marks are grouped in
// buckets by the minute their nonce expires, and Run deletes a bucket's marks once its nonces
// have been expired for nonceSkew: a nonce's mark outlives the nonce on every keybroker whose
// clock is within nonceSkew of the one that deletes it.
const (
	nonceRandomSize = 16
	nonceExpirySize = 6
	nonceTagSize    = attest.NonceSize - nonceRandomSize - nonceExpirySize

	// nonceSkew is the clock skew tolerated between keybrokers sharing a Vault.
	nonceSkew = time.Minute
	// nonceBucket is the span of expiry times whose marks share a KV folder.
	nonceBucket = time.Minute

	nonceKeyPath    = "config/nonce-key"
	nonceMarksDir   = "nonces/"
	nonceMACContext = "lethe/v1/nonce"
)

// NonceWrappingKey is the Transit key (aes256-gcm96) that wraps the nonce key.
const NonceWrappingKey = "lethe-nonce-wrapping"

// nonceVault is what nonces need of Vault.
type nonceVault interface {
	// nonceKey returns the 32-byte nonce key shared by the keybrokers, creating it if there
	// is none yet.
	nonceKey(ctx context.Context) ([]byte, error)
	// markUsed records that the nonce whose digest is name, expiring at expires, was
	// consumed; errConflict if it already was.
	markUsed(ctx context.Context, name string, expires time.Time) error
	// sweepUsed forgets the marks of nonces that expired by before (and may keep some of
	// them longer) and returns how many it deleted.
	sweepUsed(ctx context.Context, before time.Time) (int, error)
}

// nonceStore issues and consumes nonces: 32 bytes per (migration, role), unpredictable, single
// use across every keybroker on the same Vault, with a TTL. What it keeps is bounded: in
// memory, the expiry times of the nonces this keybroker issued that are still live (at most
// max); in Vault, one mark per consumed nonce until it has expired (see sweep).
type nonceStore struct {
	now   func() time.Time
	ttl   time.Duration
	max   int
	vault nonceVault

	keyMu sync.Mutex
	key   []byte // loaded once, then never changed

	mu   sync.Mutex
	live []time.Time // expiry times of issued nonces, in issuing order
}

func newNonceStore(now func() time.Time, ttl time.Duration, max int, v nonceVault) *nonceStore {
	return &nonceStore{now: now, ttl: ttl, max: max, vault: v}
}

// macKey returns the nonce key, loading it from Vault on first use.
func (s *nonceStore) macKey(ctx context.Context) ([]byte, error) {
	s.keyMu.Lock()
	defer s.keyMu.Unlock()
	if s.key != nil {
		return s.key, nil
	}
	key, err := s.vault.nonceKey(ctx)
	if err != nil {
		return nil, fmt.Errorf("loading the nonce key: %w", err)
	}
	if len(key) != sha256.Size {
		return nil, fmt.Errorf("loading the nonce key: %d bytes, want %d", len(key), sha256.Size)
	}
	s.key = key
	return key, nil
}

// tag computes a nonce's tag into dst.
func nonceTag(dst, key []byte, migration string, role attest.Role, body []byte) {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(nonceMACContext))
	m.Write([]byte{byte(len(migration))})
	m.Write([]byte(migration))
	m.Write([]byte{byte(len(role))})
	m.Write([]byte(role))
	m.Write(body)
	copy(dst, m.Sum(nil))
}

// issue returns a fresh nonce for (migration, role) and when it expires. It asks Vault
// nothing once the nonce key is loaded. Earlier nonces of (migration, role) stay valid until
// they expire or are consumed. It returns ErrNonceStoreFull, or an error wrapping
// ErrVaultUnavailable when the nonce key cannot be loaded.
func (s *nonceStore) issue(ctx context.Context, migration string, role attest.Role) ([]byte, time.Time, error) {
	key, err := s.macKey(ctx)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing nonce: %w", err)
	}
	now := s.now()
	exp := time.UnixMilli(now.Add(s.ttl).UnixMilli())
	if err := s.reserve(now, exp); err != nil {
		return nil, time.Time{}, err
	}
	n := make([]byte, attest.NonceSize)
	rand.Read(n[:nonceRandomSize])
	putExpiry(n[nonceRandomSize:nonceRandomSize+nonceExpirySize], exp)
	nonceTag(n[nonceRandomSize+nonceExpirySize:], key, migration, role, n[:nonceRandomSize+nonceExpirySize])
	return n, exp, nil
}

// reserve counts a nonce expiring at exp among the live ones, refusing it when max are live.
func (s *nonceStore) reserve(now, exp time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pruneLocked(now)
	if len(s.live) >= s.max {
		return fmt.Errorf("issuing nonce: %d live nonces: %w", len(s.live), ErrNonceStoreFull)
	}
	s.live = append(s.live, exp)
	return nil
}

// pruneLocked forgets the live nonces that expired by now.
func (s *nonceStore) pruneLocked(now time.Time) {
	i := 0
	for i < len(s.live) && !now.Before(s.live[i]) {
		i++
	}
	s.live = s.live[i:]
}

func putExpiry(b []byte, t time.Time) {
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], uint64(t.UnixMilli()))
	copy(b, buf[8-nonceExpirySize:])
}

func getExpiry(b []byte) time.Time {
	var buf [8]byte
	copy(buf[8-nonceExpirySize:], b)
	return time.UnixMilli(int64(binary.BigEndian.Uint64(buf[:])))
}

// nonceUse is a nonce that checked out, ready to be spent.
type nonceUse struct {
	migration string
	role      attest.Role
	mark      string
	expires   time.Time
}

// check verifies, without Vault once the nonce key is loaded, that nonce was issued for
// (migration, role) by a keybroker sharing this one's nonce key and has not expired. It does
// not consume it: spend does. It returns ErrNonceUnknown, ErrNonceExpired, or an error
// wrapping ErrVaultUnavailable when the nonce key cannot be loaded.
func (s *nonceStore) check(ctx context.Context, migration string, role attest.Role, nonce []byte) (*nonceUse, error) {
	key, err := s.macKey(ctx)
	if err != nil {
		return nil, fmt.Errorf("checking %s nonce of migration %s: %w", role, migration, err)
	}
	if len(nonce) != attest.NonceSize {
		return nil, fmt.Errorf("%s nonce of migration %s: %d bytes: %w", role, migration, len(nonce), ErrNonceUnknown)
	}
	var tag [nonceTagSize]byte
	body := nonce[:nonceRandomSize+nonceExpirySize]
	nonceTag(tag[:], key, migration, role, body)
	if !hmac.Equal(tag[:], nonce[len(body):]) {
		return nil, fmt.Errorf("%s nonce of migration %s: %w", role, migration, ErrNonceUnknown)
	}
	exp := getExpiry(nonce[nonceRandomSize:])
	now := s.now()
	if !now.Before(exp) {
		return nil, fmt.Errorf("%s nonce of migration %s: %w", role, migration, ErrNonceExpired)
	}
	// A keybroker issues nonces for at most its TTL (give or take the skew between clocks): a
	// later expiry was not made by one, and its mark could be swept while it is still valid.
	if exp.After(now.Add(s.ttl + nonceSkew)) {
		return nil, fmt.Errorf("%s nonce of migration %s expires too late: %w", role, migration, ErrNonceUnknown)
	}
	d := sha256.Sum256(nonce)
	return &nonceUse{migration: migration, role: role, mark: hex.EncodeToString(d[:]), expires: exp}, nil
}

// spend consumes a checked nonce: of all the keybrokers that spend it, exactly one succeeds.
// It returns ErrNonceUsed, or an error wrapping ErrVaultUnavailable (the nonce may or may not
// be spent; nothing may be released on it).
func (s *nonceStore) spend(ctx context.Context, u *nonceUse) error {
	if err := s.vault.markUsed(ctx, u.mark, u.expires); err != nil {
		if errors.Is(err, errConflict) {
			return fmt.Errorf("%s nonce of migration %s: %w", u.role, u.migration, ErrNonceUsed)
		}
		return fmt.Errorf("consuming %s nonce of migration %s: %w", u.role, u.migration, err)
	}
	return nil
}

// consume checks nonce against (migration, role) and spends it. It returns check's and
// spend's errors.
func (s *nonceStore) consume(ctx context.Context, migration string, role attest.Role, nonce []byte) error {
	u, err := s.check(ctx, migration, role, nonce)
	if err != nil {
		return err
	}
	return s.spend(ctx, u)
}

// sweep forgets the live nonces that expired and deletes from Vault the marks of nonces
// expired for longer than the tolerated clock skew. It returns Vault's error, if any.
func (s *nonceStore) sweep(ctx context.Context) error {
	now := s.now()
	s.mu.Lock()
	s.pruneLocked(now)
	s.mu.Unlock()
	if _, err := s.vault.sweepUsed(ctx, now.Add(-nonceSkew)); err != nil {
		return fmt.Errorf("sweeping used nonces: %w", err)
	}
	return nil
}

// nonceKeyRecord is the nonce key, wrapped by NonceWrappingKey, in KV at config/nonce-key.
type nonceKeyRecord struct {
	Wrapped string `json:"wrapped"`
}

// nonceMark is a consumed nonce's mark, in KV at nonces/<bucket>/<digest>.
type nonceMark struct {
	Expires time.Time `json:"expires"`
}

// vaultNonces implements nonceVault on Transit and KV v2.
type vaultNonces struct {
	keys keyStore
	recs recordStore
}

func (v *vaultNonces) nonceKey(ctx context.Context) ([]byte, error) {
	// Two rounds at most: read, or create and lose the race to a keybroker whose key is then
	// read.
	for range 2 {
		var rec nonceKeyRecord
		ver, err := v.recs.get(ctx, nonceKeyPath, &rec)
		if err != nil {
			return nil, err
		}
		if ver != 0 {
			return v.keys.decrypt(ctx, NonceWrappingKey, rec.Wrapped)
		}
		if err := v.keys.createKey(ctx, NonceWrappingKey, "aes256-gcm96"); err != nil {
			return nil, err
		}
		key, wrapped, err := v.keys.dataKey(ctx, NonceWrappingKey)
		if err != nil {
			return nil, err
		}
		_, err = v.recs.put(ctx, nonceKeyPath, &nonceKeyRecord{Wrapped: wrapped}, 0)
		if err == nil {
			return key, nil
		}
		clear(key)
		if !errors.Is(err, errConflict) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("creating the nonce key: %w", errConflict)
}

// bucketOf names the bucket of marks of nonces expiring at t.
func bucketOf(t time.Time) int64 { return t.Unix() / int64(nonceBucket/time.Second) }

func (v *vaultNonces) markUsed(ctx context.Context, name string, expires time.Time) error {
	path := nonceMarksDir + strconv.FormatInt(bucketOf(expires), 10) + "/" + name
	_, err := v.recs.put(ctx, path, &nonceMark{Expires: expires.UTC()}, 0)
	return err
}

// sweepConcurrency bounds the deletions a sweep has in flight.
const sweepConcurrency = 8

func (v *vaultNonces) sweepUsed(ctx context.Context, before time.Time) (int, error) {
	buckets, err := v.recs.list(ctx, nonceMarksDir)
	if err != nil {
		return 0, err
	}
	var (
		mu      sync.Mutex
		deleted int
		errs    []error
		wg      sync.WaitGroup
		sem     = make(chan struct{}, sweepConcurrency)
	)
	for _, b := range buckets {
		n, err := strconv.ParseInt(strings.TrimSuffix(b, "/"), 10, 64)
		// A bucket holds expiries before its end: sweep it once before reaches that end.
		if err != nil || time.Unix((n+1)*int64(nonceBucket/time.Second), 0).After(before) {
			continue
		}
		dir := nonceMarksDir + strconv.FormatInt(n, 10) + "/"
		marks, err := v.recs.list(ctx, dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, m := range marks {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				err := v.recs.remove(ctx, dir+m)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, err)
					return
				}
				deleted++
			})
		}
	}
	wg.Wait()
	return deleted, errors.Join(errs...)
}
