package dataplane

import (
	"crypto/sha256"
	"encoding/binary"
)

// memoryRootInfo prefixes the memory root.
const memoryRootInfo = "lethe/v1/memory"

// digestPages is the number of pages a chunk digest covers: 64 pages, 256 KiB.
const digestPages = 64

// zeroPageDigest is the SHA-256 of a zero page.
var zeroPageDigest = sha256.Sum256(zeroPage[:])

// chunkDigests is the memory digest of a region kept page by page, so that the pause before
// cutover hashes only the pages sent or written in the final round, not the whole memory.
//
// Every page has a digest, set when the page is sent (source) or written (destination);
// every digest chunk (digestPages pages; the last may be shorter) has a digest of its pages'
// digests, and the root is a digest of the chunk digests:
//
//	page(i)  = SHA-256(page i)
//	chunk(c) = SHA-256(page(64c) ‖ … ‖ page(min(64c+63, pages-1)))
//	root     = SHA-256("lethe/v1/memory" ‖ uint64-BE(region bytes) ‖ chunk(0) ‖ … ‖ chunk(n-1))
//
// A digest chunk lies inside one chunk of stream assignment (chunkPages), so each page and
// chunk digest is only ever set by the hasher of one stream: they need no lock, and are read
// by the session only after that hasher has signalled, through a channel, that it has
// settled (at the end of each round on the source, at the stream's FIN on the destination). A dirty page costs its own hash (4 KiB) and its chunk's (2 KiB), whatever the size
// of memory.
type chunkDigests struct {
	region *Region
	pages  [][sha256.Size]byte
	chunks [][sha256.Size]byte
}

func newChunkDigests(r *Region) *chunkDigests {
	return &chunkDigests{
		region: r,
		pages:  make([][sha256.Size]byte, r.Pages()),
		chunks: make([][sha256.Size]byte, (r.Pages()+digestPages-1)/digestPages),
	}
}

// hashPages sets the digests of pages [first, first+n) from the region's bytes now.
func (d *chunkDigests) hashPages(first, n int) {
	for i := first; i < first+n; i++ {
		d.pages[i] = sha256.Sum256(d.region.Page(i))
	}
}

// zeroPages sets the digests of pages [first, first+n), which are zero.
func (d *chunkDigests) zeroPages(first, n int) {
	for i := first; i < first+n; i++ {
		d.pages[i] = zeroPageDigest
	}
}

// hashChunk sets chunk c's digest from its pages' digests, using buf as scratch.
func (d *chunkDigests) hashChunk(c int, buf *[digestPages * sha256.Size]byte) {
	first := c * digestPages
	n := min(digestPages, len(d.pages)-first)
	for i := range n {
		copy(buf[i*sha256.Size:], d.pages[first+i][:])
	}
	d.chunks[c] = sha256.Sum256(buf[:n*sha256.Size])
}

// hashAll sets every page and chunk digest from the region's bytes now: a full pass over memory.
func (d *chunkDigests) hashAll() {
	var buf [digestPages * sha256.Size]byte
	d.hashPages(0, len(d.pages))
	for c := range d.chunks {
		d.hashChunk(c, &buf)
	}
}

// root combines the chunk digests into the memory root.
func (d *chunkDigests) root() []byte {
	h := sha256.New()
	h.Write([]byte(memoryRootInfo))
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(d.region.Size())))
	for i := range d.chunks {
		h.Write(d.chunks[i][:])
	}
	return h.Sum(nil)
}

// MemoryRoot returns the memory digest of r as the data plane computes it at cutover: the
// root of chunkDigests (SHA-256("lethe/v1/memory" ‖ uint64-BE(size in bytes) ‖ the digest of
// each 64-page chunk, which is the SHA-256 of its pages' SHA-256s). It reads the whole region.
func MemoryRoot(r *Region) []byte {
	d := newChunkDigests(r)
	d.hashAll()
	return d.root()
}

// subchunks is the number of digest chunks in a chunk of stream assignment.
const subchunks = chunkPages / digestPages

// chunkCursor is the chunk of stream assignment a stream's goroutine is in the middle of, and
// which of its digest chunks it has sent or written pages of: their chunk digests are
// recomputed once the stream moves on to another chunk, or at a flush or FIN (settle), and
// not before, so a digest chunk visited by many small frames in one round is hashed once.
type chunkCursor struct {
	digests *chunkDigests
	chunk   int // -1: none
	touched uint8
	buf     [digestPages * sha256.Size]byte
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

// settle recomputes the digests of the digest chunks the stream touched in its current
// chunk, if any.
func (cc *chunkCursor) settle() {
	for sub := range subchunks {
		if cc.touched&(1<<sub) != 0 {
			cc.digests.hashChunk(cc.chunk*subchunks+sub, &cc.buf)
		}
	}
	cc.chunk, cc.touched = -1, 0
}
