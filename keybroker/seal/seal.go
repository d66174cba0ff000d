// Package seal seals released keys to an agent's ephemeral HPKE key and opens them again.
//
// The suite is fixed: KEM ML-KEM-768+X25519 (post-quantum hybrid), KDF HKDF-SHA256, AEAD
// AES-256-GCM (RFC 9180, Go's crypto/hpke). The HPKE info binds the migration and the role:
//
//	info = "lethe/v1/release" ‖ migration-id ‖ role
//
// with every field length-prefixed as in attest.Binding, so a blob sealed for one migration or
// role does not open as another's.
//
// The keybroker calls Seal; an agent calls GenerateKey, binds the public key into its
// evidence, calls Open once the keys arrive, and Zeroize on Keys as soon as it has taken what
// it needs. The private key outlives Open for a migration: the data-plane handshake makes
// each end prove it holds it (Encapsulate to the peer's key, Decapsulate with one's own), so a
// source or destination zeroizes it when its transfer or reception ends or is aborted; an
// adoption, which has no handshake, zeroizes it as soon as the keys are open. This package
// imports no Vault or network code.
//
// Caveat: Go offers no way to wipe the memory of a parsed crypto/hpke private key. Zeroize
// wipes the serialized private key this package keeps and drops the parsed one; what the
// runtime copied internally is left to the garbage collector.
package seal

import (
	"crypto/hpke"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/attest"
)

// KeySize is the size of a memory data key (MDK) and of a transfer key (TK).
const KeySize = 32

// ErrOpen is returned (wrapped) by Open for a blob that does not open with the key and
// context given.
var ErrOpen = errors.New("opening sealed keys")

const (
	magic      = "LK1"
	flagTK     = 1 << 0
	flagMDK    = 1 << 1
	headerSize = len(magic) + 1 + 8 // magic, flags, epoch
)

func kem() hpke.KEM   { return hpke.MLKEM768X25519() }
func kdf() hpke.KDF   { return hpke.HKDFSHA256() }
func aead() hpke.AEAD { return hpke.AES256GCM() }

// Keys are the plaintext keys a release gives one agent. A zero-length field is absent.
type Keys struct {
	// TK is the migration's transfer key (source and destination).
	TK []byte
	// MDK is the memory data key of epoch Epoch (destination, and adoption).
	MDK []byte
	// Epoch is the residency epoch MDK belongs to (0 without MDK).
	Epoch uint64
}

// Zeroize overwrites the keys and forgets them.
func (k *Keys) Zeroize() {
	if k == nil {
		return
	}
	clear(k.TK)
	clear(k.MDK)
	k.TK, k.MDK, k.Epoch = nil, nil, 0
}

// Info returns the HPKE info for a release to role in migrationID.
func Info(migrationID string, role attest.Role) []byte {
	var b []byte
	for _, f := range [][]byte{[]byte("lethe/v1/release"), []byte(migrationID), []byte(role)} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

// PrivateKey is an agent's ephemeral HPKE key pair for one migration.
type PrivateKey struct {
	seed []byte
	key  hpke.PrivateKey
}

// GenerateKey returns a fresh key pair.
func GenerateKey() (*PrivateKey, error) {
	k, err := kem().GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("generating HPKE key: %w", err)
	}
	seed, err := k.Bytes()
	if err != nil {
		return nil, fmt.Errorf("generating HPKE key: %w", err)
	}
	return &PrivateKey{seed: seed, key: k}, nil
}

// PublicKey returns the serialized public key, the bytes an agent binds into its evidence.
func (k *PrivateKey) PublicKey() []byte { return k.key.PublicKey().Bytes() }

// Zeroize wipes the serialized private key and drops the parsed one; k cannot open anything
// afterwards.
func (k *PrivateKey) Zeroize() {
	clear(k.seed)
	k.seed, k.key = nil, nil
}

// Zeroized reports whether Zeroize was called on k: it can then neither Open nor Decapsulate.
func (k *PrivateKey) Zeroized() bool { return k.key == nil }

// CheckPublicKey reports whether pub is a well-formed public key of the suite.
func CheckPublicKey(pub []byte) error {
	if _, err := kem().NewPublicKey(pub); err != nil {
		return fmt.Errorf("parsing HPKE public key: %w", err)
	}
	return nil
}

// Seal encrypts keys to pub for role in migrationID. keys must hold a KeySize TK, a KeySize
// MDK, or both. The plaintext encoding is wiped before Seal returns; keys is left to the
// caller to zeroize.
func Seal(pub []byte, migrationID string, role attest.Role, keys *Keys) ([]byte, error) {
	pk, err := kem().NewPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("sealing keys: parsing HPKE public key: %w", err)
	}
	pt, err := encode(keys)
	if err != nil {
		return nil, fmt.Errorf("sealing keys: %w", err)
	}
	defer clear(pt)
	ct, err := hpke.Seal(pk, kdf(), aead(), Info(migrationID, role), pt)
	if err != nil {
		return nil, fmt.Errorf("sealing keys: %w", err)
	}
	return ct, nil
}

// Open decrypts a blob sealed to k for role in migrationID. It returns an error wrapping
// ErrOpen when the blob does not open (another key, migration or role, or tampering).
func (k *PrivateKey) Open(migrationID string, role attest.Role, sealed []byte) (*Keys, error) {
	if k.Zeroized() {
		return nil, fmt.Errorf("%w: the private key was zeroized", ErrOpen)
	}
	pt, err := hpke.Open(k.key, kdf(), aead(), Info(migrationID, role), sealed)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrOpen, err)
	}
	defer clear(pt)
	keys, err := decode(pt)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrOpen, err)
	}
	return keys, nil
}

// encode lays keys out as magic ‖ flags ‖ epoch ‖ TK? ‖ MDK?.
func encode(k *Keys) ([]byte, error) {
	if k == nil || (len(k.TK) == 0 && len(k.MDK) == 0) {
		return nil, errors.New("no key to seal")
	}
	var flags byte
	if len(k.TK) > 0 {
		if len(k.TK) != KeySize {
			return nil, fmt.Errorf("transfer key is %d bytes, want %d", len(k.TK), KeySize)
		}
		flags |= flagTK
	}
	if len(k.MDK) > 0 {
		if len(k.MDK) != KeySize {
			return nil, fmt.Errorf("memory data key is %d bytes, want %d", len(k.MDK), KeySize)
		}
		flags |= flagMDK
	}
	b := make([]byte, 0, headerSize+2*KeySize)
	b = append(b, magic...)
	b = append(b, flags)
	b = binary.BigEndian.AppendUint64(b, k.Epoch)
	b = append(b, k.TK...)
	b = append(b, k.MDK...)
	return b, nil
}

func decode(b []byte) (*Keys, error) {
	if len(b) < headerSize || string(b[:len(magic)]) != magic {
		return nil, errors.New("not a sealed key set")
	}
	flags := b[len(magic)]
	k := &Keys{Epoch: binary.BigEndian.Uint64(b[len(magic)+1 : headerSize])}
	rest := b[headerSize:]
	take := func() []byte {
		out := make([]byte, KeySize)
		copy(out, rest)
		rest = rest[KeySize:]
		return out
	}
	want := 0
	if flags&flagTK != 0 {
		want += KeySize
	}
	if flags&flagMDK != 0 {
		want += KeySize
	}
	if flags&^(flagTK|flagMDK) != 0 || want == 0 || len(rest) != want {
		return nil, errors.New("malformed sealed key set")
	}
	if flags&flagTK != 0 {
		k.TK = take()
	}
	if flags&flagMDK != 0 {
		k.MDK = take()
	}
	return k, nil
}

// SecretSize is the size of the secret Encapsulate and Decapsulate agree on.
const SecretSize = 32

// Encapsulate makes a fresh secret that only the holder of pub's private key can recover
// (Decapsulate with the same context): enc is the KEM ciphertext to send, secret the 32 bytes
// both sides then hold. The data plane uses it to make each end prove it holds the HPKE key
// its evidence binds. The caller clears secret.
func Encapsulate(pub []byte, context string) (enc, secret []byte, err error) {
	pk, err := kem().NewPublicKey(pub)
	if err != nil {
		return nil, nil, fmt.Errorf("encapsulating: parsing HPKE public key: %w", err)
	}
	enc, s, err := hpke.NewSender(pk, kdf(), hpke.ExportOnly(), []byte(context))
	if err != nil {
		return nil, nil, fmt.Errorf("encapsulating: %w", err)
	}
	if secret, err = s.Export(exportLabel, SecretSize); err != nil {
		return nil, nil, fmt.Errorf("encapsulating: %w", err)
	}
	return enc, secret, nil
}

// Decapsulate recovers the secret of a KEM ciphertext made by Encapsulate for k's public key
// and context. A ciphertext for another key or context yields another secret (ML-KEM rejects
// implicitly), so a wrong peer shows only when the secrets are used; a malformed one is an
// error wrapping ErrOpen.
func (k *PrivateKey) Decapsulate(enc []byte, context string) ([]byte, error) {
	if k.Zeroized() {
		return nil, fmt.Errorf("%w: the private key was zeroized", ErrOpen)
	}
	r, err := hpke.NewRecipient(enc, k.key, kdf(), hpke.ExportOnly(), []byte(context))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrOpen, err)
	}
	secret, err := r.Export(exportLabel, SecretSize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrOpen, err)
	}
	return secret, nil
}

// exportLabel is the HPKE exporter context of Encapsulate's secret.
const exportLabel = "lethe/v1/possession"

// EncapsulatedSize is the size of the KEM ciphertext Encapsulate returns: ML-KEM-768's
// ciphertext (1088 bytes) and an X25519 share (32).
const EncapsulatedSize = 1088 + 32
