package migagent

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"math/rand/v2"
	"net"
	"testing"
)

func testKey(t testing.TB, seed byte) *SecretKey {
	t.Helper()
	b := make([]byte, KeySize)
	for i := range b {
		b[i] = seed + byte(i)
	}
	k, err := NewSecretKey(b)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func testRegion(t testing.TB, size int64) *Region {
	t.Helper()
	r, err := NewRegion(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// fillRegion writes pseudo-random data to every page but leaves every eighth page zero.
func fillRegion(r *Region, seed uint64) {
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	for i := range r.Pages() {
		if i%8 == 7 {
			continue
		}
		rng.Read(r.Page(i))
		binary.LittleEndian.PutUint64(r.Page(i), uint64(i))
	}
}

// regionHash is SHA-256 over the SHA-256 of every page.
func regionHash(r *Region) [32]byte {
	outer := sha256.New()
	for i := range r.Pages() {
		h := sha256.Sum256(r.Page(i))
		outer.Write(h[:])
	}
	return [32]byte(outer.Sum(nil))
}

func listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// hashingPauser pauses a workload, then records the hash of the region: the memory the
// destination must hold at cutover.
type hashingPauser struct {
	w      *Workload
	r      *Region
	hash   [32]byte
	paused bool
}

func (p *hashingPauser) Pause(ctx context.Context) error {
	if err := p.w.Pause(ctx); err != nil {
		return err
	}
	p.hash, p.paused = regionHash(p.r), true
	return nil
}

func (p *hashingPauser) Resume(ctx context.Context) error { return p.w.Resume(ctx) }
