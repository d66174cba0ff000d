package migagent

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

// Labels of the keys derived from TK and MDK.
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
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, fmt.Errorf("creating cipher: %w", err)
	}
	return cipher.NewGCM(block)
}

// streamAEAD derives the key of one stream and direction.
func streamAEAD(tk *SecretKey, migrationID string, dir direction, index uint32) (cipher.AEAD, error) {
	var info [len(streamInfo) + 1 + 4]byte
	copy(info[:], streamInfo)
	info[len(streamInfo)] = byte(dir)
	binary.BigEndian.PutUint32(info[len(streamInfo)+1:], index)
	var aead cipher.AEAD
	err := tk.use(func(key []byte) error {
		var err error
		aead, err = deriveAEAD(key, []byte(migrationID), string(info[:]))
		return err
	})
	return aead, err
}

// macKey derives an HMAC key from TK. The caller clears it.
func macKey(tk *SecretKey, migrationID, info string) ([]byte, error) {
	var k []byte
	err := tk.use(func(key []byte) error {
		var err error
		k, err = hkdf.Key(sha256.New, key, []byte(migrationID), info, 32)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("deriving %s key: %w", info, err)
	}
	return k, nil
}

func mac(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}
