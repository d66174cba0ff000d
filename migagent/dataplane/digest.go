package dataplane

import (
	"crypto/sha256"
	"encoding/binary"
)

// memoryRootInfo prefixes the memory root.
const memoryRootInfo = "lethe/v1/memory"

// chunkDigests is the memory digest of a region kept chunk by chunk, so that the pause before
// cutover hashes only the chunks written in the final round, not the whole memory.
//
// A chunk is the unit by which pages are assigned to streams (chunkPages pages; the last
// chunk may be shorter), so each chunk is only ever read (source) or written (destination)
// by the goroutine of one stream, which also hashes it: sums[c] needs no lock, and is read
// by the session only after that goroutine has signalled, through a channel, that it is done.
//
// The memory root is
//
//	SHA-256("lethe/v1/memory" ‖ uint64-BE(region bytes) ‖ SHA-256(chunk 0) ‖ … ‖ SHA-256(chunk n-1))
type chunkDigests struct {
	region *Region
	sums   [][sha256.Size]byte
}

func newChunkDigests(r *Region) *chunkDigests {
	return &chunkDigests{region: r, sums: make([][sha256.Size]byte, (r.Pages()+chunkPages-1)/chunkPages)}
}

// hash sets chunk c's digest from the region's bytes now.
func (d *chunkDigests) hash(c int) {
	first := c * chunkPages
	d.sums[c] = sha256.Sum256(d.region.pageRange(first, min(chunkPages, d.region.Pages()-first)))
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
// SHA-256("lethe/v1/memory" ‖ uint64-BE(size in bytes) ‖ the SHA-256 of each 1 MiB chunk
// of r in order, the last one possibly shorter). It reads the whole region.
func MemoryRoot(r *Region) []byte {
	d := newChunkDigests(r)
	d.hashAll()
	return d.root()
}

// chunkCursor is the chunk a stream's goroutine is in the middle of: the chunk is hashed once
// the stream moves on to another chunk, or at a flush or FIN (settle), and not before, so a
// chunk visited by many small frames in one round is hashed once.
type chunkCursor struct {
	digests *chunkDigests
	chunk   int // -1: none
}

// touch says the stream is about to read or write pages of chunk c.
func (cc *chunkCursor) touch(c int) {
	if cc.chunk == c {
		return
	}
	cc.settle()
	cc.chunk = c
}

// settle hashes the chunk the stream was in, if any.
func (cc *chunkCursor) settle() {
	if cc.chunk >= 0 {
		cc.digests.hash(cc.chunk)
		cc.chunk = -1
	}
}
