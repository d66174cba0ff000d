package attest

import (
	"container/list"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"time"
)

// A verifiedCache remembers verifications that succeeded, so that a repeated verification
// skips the signature math it already did. Every Verifier has its own; nothing is shared
// between Verifiers.
//
// # Why a hit is as good as doing the work again
//
// An entry records only facts that are pure functions of the bytes its key is hashed from:
// "this certificate's signature verifies under that certificate's key", "this CRL's
// signature verifies under that ARK's key", "this certificate passed the library's checks
// of its version, algorithms, names and extensions". The key is SHA-256 over every byte
// such a fact depends on (each field length-prefixed, under a label naming the kind of
// fact), so an entry is found again only for exactly the same certificates, roots and
// documents: two different roots, a different leaf, a different CRL each give another key,
// and finding a wrong entry would take a SHA-256 collision.
//
// Nothing that changes from call to call is cached: every call still checks the report's
// own signature with the leaf key, the validity period of every certificate and the
// freshness of every CRL against the configured clock, revocation against the CRL read from
// the collateral cache on that call, and REPORT_DATA. When any of those per-call checks
// fails on a hit, the verifier drops the shortcut and takes the full path it takes without
// a cache, so a rejection is the same rejection, with the same reason and message, whether
// the cache was warm or cold. The cache only ever turns a full-path success into a faster
// success.
//
// It is bounded (least recently used entries are evicted) and safe for concurrent use. The
// values it holds are shared between goroutines and must be treated as read-only.
type verifiedCache[V any] struct {
	mu    sync.Mutex
	max   int
	items map[cacheKey]*list.Element
	order *list.List // of *cacheItem[V]; front: most recently used

	hits, misses atomic.Uint64
}

// cacheKey is SHA-256 over a label and the exact bytes a cached fact depends on.
type cacheKey [sha256.Size]byte

type cacheItem[V any] struct {
	key cacheKey
	val V
}

// Cache sizes. A chain entry is a few parsed certificates: a keybroker serving a fleet of a
// thousand hosts keeps all their chains in a few MiB. CRLs change rarely; a handful of
// versions per product line is plenty.
const (
	chainCacheSize = 1024
	crlCacheSize   = 32
)

func newVerifiedCache[V any](max int) *verifiedCache[V] {
	return &verifiedCache[V]{max: max, items: map[cacheKey]*list.Element{}, order: list.New()}
}

// get returns the value stored under k, and marks it recently used.
func (c *verifiedCache[V]) get(k cacheKey) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[k]
	if !ok {
		c.misses.Add(1)
		var zero V
		return zero, false
	}
	c.hits.Add(1)
	c.order.MoveToFront(e)
	return e.Value.(*cacheItem[V]).val, true
}

// put stores v under k, evicting the least recently used entry when the cache is full.
func (c *verifiedCache[V]) put(k cacheKey, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[k]; ok {
		e.Value.(*cacheItem[V]).val = v
		c.order.MoveToFront(e)
		return
	}
	c.items[k] = c.order.PushFront(&cacheItem[V]{key: k, val: v})
	for c.order.Len() > c.max {
		oldest := c.order.Back()
		c.order.Remove(oldest)
		delete(c.items, oldest.Value.(*cacheItem[V]).key)
	}
}

// len returns the number of entries.
func (c *verifiedCache[V]) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}

// keyOf returns the cache key of a fact of kind label about fields. Every field is
// length-prefixed, so that no two different lists of fields share an encoding.
func keyOf(label string, fields ...[]byte) cacheKey {
	h := sha256.New()
	var n [8]byte
	write := func(b []byte) {
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	write([]byte(label))
	for _, f := range fields {
		write(f)
	}
	var k cacheKey
	h.Sum(k[:0])
	return k
}

// validAt reports whether every certificate of chain is within its validity period at now,
// checked as crypto/x509 checks it when it builds a chain.
func validAt(chain []*x509.Certificate, now time.Time) bool {
	for _, c := range chain {
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return false
		}
	}
	return len(chain) > 0
}
