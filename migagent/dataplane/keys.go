package dataplane

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// direction is the first byte after "lethe/v1/stream" in a stream key's HKDF info.
type direction byte

const (
	sourceToDestination direction = 's'
	destinationToSource direction = 'd'
)

// Labels of the keys derived from the session secret and MDK, and of the commit transcript.
const (
	streamInfo  = "lethe/v1/stream"
	confirmInfo = "lethe/v1/confirm"
	commitInfo  = "lethe/v1/commit"
	spoolInfo   = "lethe/v1/spool"
)

// deriveAEAD returns AES-256-GCM under HKDF-SHA256(secret, salt, info).
func deriveAEAD(secret, salt []byte, info string) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, secret, salt, info, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving key: %w", err)
	}
	defer clear(k)
	return newAEAD(k)
}

func newAEAD(k []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, fmt.Errorf("creating cipher: %w", err)
	}
	return cipher.NewGCM(block)
}

// newSessionSecret returns the secret every key of one session derives from:
//
//	PRK = HKDF-Extract(SHA-256, salt = T, TK ‖ ss_d ‖ ss_s)
//
// so that expanding it with info gives HKDF-SHA256(TK ‖ ss_d ‖ ss_s, salt = T, info). It
// clears ssD and ssS. Two sessions under one TK never share a secret: each end's KEM secret
// is fresh.
func newSessionSecret(tk *SecretKey, ssD, ssS, transcript []byte) (*SecretKey, error) {
	defer clear(ssD)
	defer clear(ssS)
	var secret *SecretKey
	err := tk.use(func(key []byte) error {
		ikm := make([]byte, 0, len(key)+len(ssD)+len(ssS))
		ikm = append(append(append(ikm, key...), ssD...), ssS...)
		defer clear(ikm)
		prk, err := hkdf.Extract(sha256.New, ikm, transcript)
		if err != nil {
			return err
		}
		defer clear(prk)
		secret, err = NewSecretKey(prk)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("deriving the session secret: %w", err)
	}
	return secret, nil
}

// expandKey returns the 32-byte key labelled info of the session whose secret is secret
// (see newSessionSecret). The caller clears it.
func expandKey(secret *SecretKey, info string) ([]byte, error) {
	var k []byte
	err := secret.use(func(prk []byte) error {
		var err error
		k, err = hkdf.Expand(sha256.New, prk, info, 32)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("deriving %s key: %w", info, err)
	}
	return k, nil
}

// streamInfoFor is the HKDF info of the key of one stream and direction.
func streamInfoFor(dir direction, index uint32) string {
	var info [len(streamInfo) + 1 + 4]byte
	copy(info[:], streamInfo)
	info[len(streamInfo)] = byte(dir)
	binary.BigEndian.PutUint32(info[len(streamInfo)+1:], index)
	return string(info[:])
}

// streamAEAD derives the key of one stream and direction from the session secret.
func streamAEAD(secret *SecretKey, dir direction, index uint32) (cipher.AEAD, error) {
	k, err := expandKey(secret, streamInfoFor(dir, index))
	if err != nil {
		return nil, err
	}
	defer clear(k)
	return newAEAD(k)
}

func mac(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}
