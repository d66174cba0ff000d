package dataplane

import (
	"crypto/sha256"
	"encoding/binary"
)

// memoryRootInfo prefixes the memory root.
const memoryRootInfo = "lethe/v1/memory"

// digestPages is the size of a digest chunk: 64 pages, 256 KiB. A page dirtied in the final
// round costs the hashing of its digest chunk in the pause, so smaller is cheaper there; the
// list of chunk digests hashed into the root grows as it shrinks (32 bytes per 256 KiB).
const digestPages = 64

// chunkDigests is the memory digest of a region kept chunk by chunk, so that the pause before
// cutover hashes only the chunks written in the final round, not the whole memory.
//
// A digest chunk (digestPages pages; the last may be shorter) lies inside one chunk of stream
// assignment (chunkPages), so each is only ever read (source) or written (destination) by
// the goroutine of one stream, which also hashes it: sums[c] needs no lock, and is read by
// the session only after that goroutine has signalled, through a channel, that it is done.
//
// The memory root is
//
//	SHA-256("lethe/v1/memory" ‖ uint64-BE(region bytes) ‖ SHA-256(chunk 0) ‖ … ‖ SHA-256(chunk n-1))
type chunkDigests struct {
	region *Region
	sums   [][sha256.Size]byte
}

func newChunkDigests(r *Region) *chunkDigests {
	return &chunkDigests{region: r, sums: make([][sha256.Size]byte, (r.Pages()+digestPages-1)/digestPages)}
}

// hash sets digest chunk c's digest from the region's bytes now.
func (d *chunkDigests) hash(c int) {
	first := c * digestPages
	d.sums[c] = sha256.Sum256(d.region.pageRange(first, min(digestPages, d.region.Pages()-first)))
}

// hashAll sets every chunk's digest from the region's bytes now: a full pass over memory.
func (d *chunkDigests) hashAll() {
	for c := range d.sums {
		d.hash(c)
	}
}

// root combines the chunk digests into the memory root.
func (d *chunkDigests) root() []byte {
	h := sha256.New()
	h.Write([]byte(memoryRootInfo))
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(d.region.Size())))
	for i := range d.sums {
		h.Write(d.sums[i][:])
	}
	return h.Sum(nil)
}

// MemoryRoot returns the memory digest of r as the data plane computes it at cutover:
// SHA-256("lethe/v1/memory" ‖ uint64-BE(size in bytes) ‖ the SHA-256 of each 256 KiB chunk
// (64 pages) of r in order, the last one possibly shorter). It reads the whole region.
func MemoryRoot(r *Region) []byte {
	d := newChunkDigests(r)
	d.hashAll()
	return d.root()
}

// subchunks is the number of digest chunks in a chunk of stream assignment.
const subchunks = chunkPages / digestPages

// chunkCursor is the chunk of stream assignment a stream's goroutine is in the middle of, and
// which of its digest chunks it has read or written: they are hashed once the stream moves
// on to another chunk, or at a flush or FIN (settle), and not before, so a digest chunk
// visited by many small frames in one round is hashed once.
type chunkCursor struct {
	digests *chunkDigests
	chunk   int // -1: none
	touched uint8
}

// touch says the stream is about to read or write pages [first, first+n), which lie in one
// chunk of stream assignment.
func (cc *chunkCursor) touch(first, n int) {
	if c := first / chunkPages; cc.chunk != c {
		cc.settle()
		cc.chunk = c
	}
	base := cc.chunk * subchunks
	for sub := first / digestPages; sub <= (first+n-1)/digestPages; sub++ {
		cc.touched |= 1 << (sub - base)
	}
}

// settle hashes the digest chunks the stream touched in its current chunk, if any.
func (cc *chunkCursor) settle() {
	for sub := range subchunks {
		if cc.touched&(1<<sub) != 0 {
			cc.digests.hash(cc.chunk*subchunks + sub)
		}
	}
	cc.chunk, cc.touched = -1, 0
}
