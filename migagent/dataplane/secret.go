package dataplane

import (
	"crypto/subtle"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/lethe-cc/lethe/keybroker/seal"
)

// KeySize is the size of TK and MDK: 256 bits.
const KeySize = 32

// SecretKey holds a 256-bit key (TK or MDK) in memory of its own: a private anonymous
// mapping that is locked (mlock) so it is not swapped and excluded from core dumps where the
// operating system allows, or ordinary heap memory when it does not. Destroy zeroes it.
// A SecretKey is safe for concurrent use.
type SecretKey struct {
	mu        sync.Mutex
	b         []byte
	mapped    bool
	locked    bool
	destroyed bool
}

// NewSecretKey copies key into locked memory. The caller should clear its own copy. It
// returns an error if key is not KeySize bytes long; failing to lock memory is not an error
// (see Locked).
func NewSecretKey(key []byte) (*SecretKey, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("creating secret key: got %d bytes, want %d", len(key), KeySize)
	}
	k := &SecretKey{}
	b, err := unix.Mmap(-1, 0, unix.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err == nil {
		k.mapped = true
		k.locked = unix.Mlock(b) == nil
		_ = unix.Madvise(b, unix.MADV_DONTDUMP)
		k.b = b[:KeySize]
	} else {
		k.b = make([]byte, KeySize)
	}
	copy(k.b, key)
	return k, nil
}

// Locked reports whether the key's memory is locked against swapping.
func (k *SecretKey) Locked() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.locked
}

// Destroyed reports whether Destroy was called.
func (k *SecretKey) Destroyed() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.destroyed
}

// Equal reports, in constant time, whether k holds key. A destroyed key equals nothing.
func (k *SecretKey) Equal(key []byte) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return !k.destroyed && subtle.ConstantTimeCompare(k.b, key) == 1
}

// use calls f with the key's bytes, which f must not retain. It returns ErrKeyDestroyed
// after Destroy.
func (k *SecretKey) use(f func(key []byte) error) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.destroyed {
		return ErrKeyDestroyed
	}
	return f(k.b)
}

// Destroy zeroes the key and releases its memory. It is idempotent and safe on a nil key.
func (k *SecretKey) Destroy() {
	if k == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.destroyed {
		return
	}
	k.destroyed = true
	clear(k.b)
	if k.mapped {
		full := k.b[:cap(k.b)]
		if k.locked {
			_ = unix.Munlock(full)
		}
		_ = unix.Munmap(full)
	}
	k.b = nil
}

// Keys are the secrets a migration runs with, and the peer's public key it must meet.
type Keys struct {
	// TK is the migration's transfer key. Required. The migration destroys it when it
	// ends, whatever the outcome.
	TK *SecretKey
	// MDK is the guest's memory data key for the residency the side holds (the source's
	// current epoch, the destination's next one). May be nil when nothing is spooled. The
	// source destroys it on commit, the destination on abort; otherwise it stays the caller's.
	MDK *SecretKey
	// Identity is this agent's ephemeral HPKE key for the migration, the one its evidence
	// binds; the handshake proves to the peer that this end holds it. Required, and not
	// zeroized. The migration uses it but never zeroizes it: the caller does, once Run or
	// Receive has returned.
	Identity *seal.PrivateKey
	// PeerKey is the peer's HPKE public key as the keybroker's signed grant names it
	// (grant.Grant's Destination.HPKEPublicKey for a source, Source.HPKEPublicKey for a
	// destination); the handshake requires the peer to prove that it holds the private key.
	// Required.
	PeerKey []byte
}
