package dataplane

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"log/slog"
	"math/rand/v2"
	"net"
	"testing"

	"github.com/lethe-cc/lethe/keybroker/seal"
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

// identities are the HPKE keys of the two ends of a test migration, the keys their evidence
// would bind and their grants name.
type identities struct {
	src, dst *seal.PrivateKey
}

func newIdentities(t testing.TB) identities {
	t.Helper()
	return identities{src: testIdentity(t), dst: testIdentity(t)}
}

func testIdentity(t testing.TB) *seal.PrivateKey {
	t.Helper()
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Zeroize)
	return k
}

// source returns k with the source's identity and the destination's public key.
func (id identities) source(k Keys) Keys {
	k.Identity, k.PeerKey = id.src, id.dst.PublicKey()
	return k
}

// destination returns k with the destination's identity and the source's public key.
func (id identities) destination(k Keys) Keys {
	k.Identity, k.PeerKey = id.dst, id.src.PublicKey()
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

// rejectLog is a log handler that passes on the error of every data-plane connection a
// Destination rejects, so that a test can wait for the rejection instead of sleeping.
type rejectLog chan string

// rejections returns a logger for a Destination and the channel its rejections arrive on.
func rejections() (*slog.Logger, <-chan string) {
	h := make(rejectLog, 16)
	return slog.New(h), h
}

func (h rejectLog) Enabled(context.Context, slog.Level) bool { return true }
func (h rejectLog) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h rejectLog) WithGroup(string) slog.Handler            { return h }

func (h rejectLog) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "Rejected a data-plane connection" {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "error" {
			h <- a.Value.String()
		}
		return true
	})
	return nil
}
