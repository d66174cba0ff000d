package dataplane

import (
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// Spool keeps data of the guest outside the region (spilled pages, checkpoints, buffers)
// in a file, every record sealed with AES-256-GCM under a key derived from MDK
// (HKDF-SHA256(MDK, info = "lethe/v1/spool")) and bound to its key and the spool's path.
// Once MDK is destroyed the file is unreadable; Scrub also overwrites it. A Spool is safe for
// concurrent use.
type Spool struct {
	mu     sync.Mutex
	path   string
	f      *os.File
	aead   cipher.AEAD
	index  map[uint64]spoolRecord
	size   int64
	closed bool
}

type spoolRecord struct {
	off int64
	n   int
}

// NewSpool creates the spool file at path (which must not exist) with records sealed under
// a key derived from mdk. It returns ErrKeyDestroyed if mdk was destroyed.
func NewSpool(path string, mdk *SecretKey) (*Spool, error) {
	var aead cipher.AEAD
	err := mdk.use(func(key []byte) error {
		var err error
		aead, err = deriveAEAD(key, nil, spoolInfo)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("creating spool: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating spool: %w", err)
	}
	return &Spool{path: path, f: f, aead: aead, index: make(map[uint64]spoolRecord)}, nil
}

func (s *Spool) aad(key uint64) []byte {
	b := binary.BigEndian.AppendUint64([]byte(spoolInfo), key)
	return append(b, s.path...)
}

// Put seals data under key and appends it; a later Put of the same key replaces it.
func (s *Spool) Put(key uint64, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("writing spool: %w", os.ErrClosed)
	}
	rec := make([]byte, 12, 12+len(data)+tagSize)
	rand.Read(rec)
	rec = s.aead.Seal(rec, rec[:12], data, s.aad(key))
	if _, err := s.f.WriteAt(rec, s.size); err != nil {
		return fmt.Errorf("writing spool: %w", err)
	}
	s.index[key] = spoolRecord{off: s.size, n: len(rec)}
	s.size += int64(len(rec))
	return nil
}

// Get returns the data last Put under key. It returns an error wrapping ErrSpoolCorrupt if
// there is none or it fails authentication.
func (s *Spool) Get(key uint64) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.index[key]
	if !ok || s.closed {
		return nil, fmt.Errorf("reading spool record %d: %w", key, ErrSpoolCorrupt)
	}
	rec := make([]byte, r.n)
	if _, err := s.f.ReadAt(rec, r.off); err != nil {
		return nil, fmt.Errorf("reading spool record %d: %w", key, err)
	}
	pt, err := s.aead.Open(rec[12:12], rec[:12], rec[12:], s.aad(key))
	if err != nil {
		return nil, fmt.Errorf("reading spool record %d: %w", key, ErrSpoolCorrupt)
	}
	return pt, nil
}

// Size returns the bytes the spool file holds.
func (s *Spool) Size() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.size
}

// Scrub overwrites the whole file with zeroes, syncs it, reads it back, and removes it. It
// returns the bytes scrubbed; an error wrapping ErrNotZero if the file did not read back as
// zero. The spool cannot be used after. Scrubbing a scrubbed spool returns 0, nil.
func (s *Spool) Scrub() (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, nil
	}
	s.closed = true
	clear(s.index)
	defer os.Remove(s.path)
	defer s.f.Close()
	buf := make([]byte, 64<<10)
	for off := int64(0); off < s.size; off += int64(len(buf)) {
		n := min(int64(len(buf)), s.size-off)
		if _, err := s.f.WriteAt(buf[:n], off); err != nil {
			return 0, fmt.Errorf("scrubbing spool: %w", err)
		}
	}
	if err := s.f.Sync(); err != nil {
		return 0, fmt.Errorf("scrubbing spool: %w", err)
	}
	for off := int64(0); off < s.size; off += int64(len(buf)) {
		n := min(int64(len(buf)), s.size-off)
		if _, err := s.f.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("checking scrubbed spool: %w", err)
		}
		for _, b := range buf[:n] {
			if b != 0 {
				return s.size, fmt.Errorf("checking scrubbed spool: %w", ErrNotZero)
			}
		}
	}
	return s.size, nil
}
