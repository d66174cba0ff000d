package dataplane

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"testing"
)

// TestMemoryRootDefinition computes the memory root as docs/protocol.md defines it, from the
// region's bytes, for a region whose last chunk is short.
func TestMemoryRootDefinition(t *testing.T) {
	const size = 2*chunkPages*PageSize + 3*PageSize
	r := testRegion(t, size)
	fillRegion(r, 7)
	h := sha256.New()
	h.Write([]byte("lethe/v1/memory"))
	h.Write(binary.BigEndian.AppendUint64(nil, size))
	for first := 0; first < r.Pages(); first += 64 {
		c := sha256.New()
		for i := first; i < min(first+64, r.Pages()); i++ {
			p := sha256.Sum256(r.Page(i))
			c.Write(p[:])
		}
		h.Write(c.Sum(nil))
	}
	if got, want := MemoryRoot(r), h.Sum(nil); !bytes.Equal(got, want) {
		t.Errorf("MemoryRoot = %x, want %x", got, want)
	}
}

// TestMigrateDigestIsOfWhatWasSent: without RehashPausedMemory the source's chunk digests are
// of the pages as it sent them, so a write that bypasses dirty tracking after the pause is
// not hashed unless its page is sent again: the destination commits, and both roots are of
// the memory it received. This is the Region contract the cheap cutover relies on.
func TestMigrateDigestIsOfWhatWasSent(t *testing.T) {
	const size = 4 << 20
	srcRegion, dstRegion := testRegion(t, size), testRegion(t, size)
	fillRegion(srcRegion, 1)
	w, err := NewWorkload(WorkloadConfig{Region: srcRegion, Rate: 1000, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	ln := listen(t)
	src, err := NewSource(SourceConfig{
		MigrationID: "m-sent", Peer: ln.Addr().String(), Region: srcRegion, Guest: &sneakyPauser{w: w, r: srcRegion},
	})
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewDestination(DestinationConfig{MigrationID: "m-sent", Region: dstRegion})
	if err != nil {
		t.Fatal(err)
	}
	ids := newIdentities(t)
	m := &migration{src: src, dst: dst,
		srcKeys: ids.source(Keys{TK: testKey(t, 1), MDK: testKey(t, 5)}),
		dstKeys: ids.destination(Keys{TK: testKey(t, 1), MDK: testKey(t, 9)})}
	m.run(t, ln)
	if m.srcErr != nil || m.dstErr != nil {
		t.Fatalf("source: %v; destination: %v", m.srcErr, m.dstErr)
	}
	if want := MemoryRoot(dstRegion); !bytes.Equal(m.srcRes.MemoryDigest, want) || !bytes.Equal(m.dstRes.MemoryDigest, want) {
		t.Errorf("digests: source %x, destination %x, want the root of the memory sent %x", m.srcRes.MemoryDigest, m.dstRes.MemoryDigest, want)
	}
	if m.srcRes.Downtime <= 0 || len(m.srcRes.Rounds) == 0 || !m.srcRes.Rounds[len(m.srcRes.Rounds)-1].Final {
		t.Errorf("downtime %v, rounds %+v: want a positive downtime and a final round", m.srcRes.Downtime, m.srcRes.Rounds)
	}
}
