package dataplane

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestSpoolSealsUnderMDK(t *testing.T) {
	path := filepath.Join(t.TempDir(), "spool")
	mdk := testKey(t, 3)
	s, err := NewSpool(path, mdk)
	if err != nil {
		t.Fatal(err)
	}
	secret := bytes.Repeat([]byte("guest secret page "), 200)
	if err := s.Put(7, secret); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(7)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Get: %v", err)
	}
	raw, _ := os.ReadFile(path)
	if bytes.Contains(raw, []byte("guest secret")) {
		t.Fatal("spool file holds plaintext")
	}
	// Flip a byte of the file: the record no longer opens.
	raw[20] ^= 1
	os.WriteFile(path, raw, 0o600)
	if _, err := s.Get(7); !errors.Is(err, ErrSpoolCorrupt) {
		t.Fatalf("tampered record: got %v, want ErrSpoolCorrupt", err)
	}
	if _, err := s.Get(8); !errors.Is(err, ErrSpoolCorrupt) {
		t.Fatalf("missing record: got %v", err)
	}
	n, err := s.Scrub()
	if err != nil || n != int64(len(raw)) {
		t.Fatalf("Scrub: %d, %v", n, err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("spool file still there: %v", err)
	}
	mdk.Destroy()
	if _, err := NewSpool(path, mdk); !errors.Is(err, ErrKeyDestroyed) {
		t.Errorf("spool under a destroyed key: %v", err)
	}
}

func TestSecretKeyDestroy(t *testing.T) {
	k := testKey(t, 1)
	t.Logf("key memory locked: %v", k.Locked())
	if !k.Equal(testKeyBytes(1)) {
		t.Fatal("key differs from its input")
	}
	k.Destroy()
	k.Destroy()
	if !k.Destroyed() || k.Equal(testKeyBytes(1)) {
		t.Fatal("destroyed key still usable")
	}
	if err := k.use(func([]byte) error { return nil }); !errors.Is(err, ErrKeyDestroyed) {
		t.Fatalf("got %v", err)
	}
	if _, err := NewSecretKey(make([]byte, 16)); err == nil {
		t.Fatal("short key accepted")
	}
}

func testKeyBytes(seed byte) []byte {
	b := make([]byte, KeySize)
	for i := range b {
		b[i] = seed + byte(i)
	}
	return b
}
