package dataplane

import (
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

const (
	// PageSize is the size of a guest page as the data plane moves it.
	PageSize = 4096
	// MaxPayload is the largest plaintext payload of one frame: 1 MiB.
	MaxPayload = 1 << 20

	headerSize    = 32
	tagSize       = 16
	frameVersion  = 1
	maxFramePages = MaxPayload / PageSize
	// chunkPages is the unit by which pages are assigned to streams: pages
	// [c·chunkPages, (c+1)·chunkPages) always travel on stream c mod N, so a newer copy of a
	// page never overtakes an older one. It is a multiple of 64 so that streams never share
	// a word of a page bitmap.
	chunkPages = maxFramePages
	// finSize is a FIN's payload: four counts, the memory digest, the transcript hash.
	finSize     = 4*8 + sha256.Size + sha256.Size
	finDigestAt = 4 * 8
	ackSize     = sha256.Size + sha256.Size
	maxAbortLen = 256
)

type frameType uint8

const (
	frameMarker     frameType = 0 // never on the wire: a flush point in a send queue
	framePages      frameType = 1
	frameZeroPages  frameType = 2
	frameData       frameType = 3
	frameCloseWrite frameType = 4
	frameFin        frameType = 5
	frameAck        frameType = 6
	frameAbort      frameType = 7
)

func (t frameType) String() string {
	switch t {
	case framePages:
		return "pages"
	case frameZeroPages:
		return "zero-pages"
	case frameData:
		return "data"
	case frameCloseWrite:
		return "close-write"
	case frameFin:
		return "fin"
	case frameAck:
		return "ack"
	case frameAbort:
		return "abort"
	}
	return fmt.Sprintf("type-%d", uint8(t))
}

// header is a frame header. Wire layout, big endian:
//
//	[0] version  [1] type  [2:4] reserved, zero  [4:8] stream  [8:16] sequence
//	[16:24] first page (pages, zero-pages) or byte offset (data, close-write), else zero
//	[24:28] page count (pages, zero-pages), else zero  [28:32] sealed length (payload + tag)
type header struct {
	typ    frameType
	stream uint32
	seq    uint64
	offset uint64
	pages  uint32
	length uint32
}

func (h header) put(b []byte) {
	b[0] = frameVersion
	b[1] = byte(h.typ)
	b[2], b[3] = 0, 0
	binary.BigEndian.PutUint32(b[4:8], h.stream)
	binary.BigEndian.PutUint64(b[8:16], h.seq)
	binary.BigEndian.PutUint64(b[16:24], h.offset)
	binary.BigEndian.PutUint32(b[24:28], h.pages)
	binary.BigEndian.PutUint32(b[28:32], h.length)
}

// decodeHeader parses and checks a header. Errors wrap ErrMalformedFrame.
func decodeHeader(b []byte) (header, error) {
	h := header{
		typ:    frameType(b[1]),
		stream: binary.BigEndian.Uint32(b[4:8]),
		seq:    binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		pages:  binary.BigEndian.Uint32(b[24:28]),
		length: binary.BigEndian.Uint32(b[28:32]),
	}
	if b[0] != frameVersion {
		return h, fmt.Errorf("%w: version %d", ErrMalformedFrame, b[0])
	}
	if b[2] != 0 || b[3] != 0 {
		return h, fmt.Errorf("%w: reserved bits set", ErrMalformedFrame)
	}
	if h.length < tagSize || h.length > MaxPayload+tagSize {
		return h, fmt.Errorf("%w: sealed length %d", ErrMalformedFrame, h.length)
	}
	payload := h.length - tagSize
	ok := false
	switch h.typ {
	case framePages:
		ok = h.pages >= 1 && h.pages <= maxFramePages && payload == h.pages*PageSize
	case frameZeroPages:
		ok = h.pages >= 1 && h.pages <= maxFramePages && payload == 0
	case frameData:
		ok = h.pages == 0 && payload > 0
	case frameCloseWrite:
		ok = h.pages == 0 && payload == 0
	case frameFin:
		ok = h.pages == 0 && h.offset == 0 && payload == finSize
	case frameAck:
		ok = h.pages == 0 && h.offset == 0 && payload == ackSize
	case frameAbort:
		ok = h.pages == 0 && h.offset == 0 && payload <= maxAbortLen
	default:
		return h, fmt.Errorf("%w: unknown type %d", ErrMalformedFrame, uint8(h.typ))
	}
	if !ok {
		return h, fmt.Errorf("%w: %s frame with %d pages and %d payload bytes", ErrMalformedFrame, h.typ, h.pages, payload)
	}
	if (h.typ == framePages || h.typ == frameZeroPages) && h.offset/chunkPages != (h.offset+uint64(h.pages)-1)/chunkPages {
		return h, fmt.Errorf("%w: page range crosses a chunk boundary", ErrMalformedFrame)
	}
	return h, nil
}

// counts is what one direction of one stream carried, as a FIN states it.
type counts struct {
	frames, pages, zeroPages, dataBytes uint64
}

// frameWriter seals frames for one stream and direction. It is not safe for concurrent use.
type frameWriter struct {
	aead   cipher.AEAD
	stream uint32
	seq    uint64
	nonce  [12]byte
	hash   hash.Hash
	counts counts
}

func newFrameWriter(aead cipher.AEAD, stream uint32, transcript []byte) *frameWriter {
	h := sha256.New()
	h.Write(transcript)
	return &frameWriter{aead: aead, stream: stream, hash: h}
}

// seal writes the frame for pt into buf, growing it if needed, and returns the frame.
func (w *frameWriter) seal(buf []byte, typ frameType, offset uint64, pages uint32, pt []byte) []byte {
	n := headerSize + len(pt) + tagSize
	buf = grow(buf, n)
	h := header{typ: typ, stream: w.stream, seq: w.seq, offset: offset, pages: pages, length: uint32(len(pt) + tagSize)}
	h.put(buf[:headerSize])
	binary.BigEndian.PutUint64(w.nonce[4:], w.seq)
	w.aead.Seal(buf[headerSize:headerSize], w.nonce[:], pt, buf[:headerSize])
	w.hash.Write(buf[:headerSize])
	w.hash.Write(buf[n-tagSize : n])
	w.seq++
	w.counts.frames++
	switch typ {
	case framePages:
		w.counts.pages += uint64(pages)
	case frameZeroPages:
		w.counts.zeroPages += uint64(pages)
	case frameData:
		w.counts.dataBytes += uint64(len(pt))
	}
	return buf[:n]
}

// fin returns the FIN payload for everything sealed so far, carrying digest, the memory root of
// the guest memory the source sent (all zero without a memory transfer).
func (w *frameWriter) fin(dst, digest []byte) []byte {
	dst = finPayload(dst, w.counts, digest, w.hash)
	return dst
}

// finPayload lays a FIN out as frames ‖ pages ‖ zero pages ‖ data bytes (8 bytes each,
// big endian) ‖ memory digest (32 bytes) ‖ transcript hash (32 bytes).
func finPayload(dst []byte, c counts, digest []byte, h hash.Hash) []byte {
	dst = binary.BigEndian.AppendUint64(dst, c.frames)
	dst = binary.BigEndian.AppendUint64(dst, c.pages)
	dst = binary.BigEndian.AppendUint64(dst, c.zeroPages)
	dst = binary.BigEndian.AppendUint64(dst, c.dataBytes)
	var d [sha256.Size]byte
	copy(d[:], digest)
	dst = append(dst, d[:]...)
	return h.Sum(dst)
}

// frameReader reads and opens frames of one stream and direction. read and open may run in
// different goroutines as long as each is called in frame order.
type frameReader struct {
	r      io.Reader
	aead   cipher.AEAD
	stream uint32
	seq    uint64 // next expected, owned by read
	hdr    [headerSize]byte
	// ahead is how many bytes of the next header are already in hdr: read asks for them
	// together with a frame's body, which saves a system call per frame.
	ahead  int
	nonce  [12]byte
	hash   hash.Hash // owned by open
	counts counts    // owned by open
}

func newFrameReader(r io.Reader, aead cipher.AEAD, stream uint32, transcript []byte) *frameReader {
	h := sha256.New()
	h.Write(transcript)
	return &frameReader{r: r, aead: aead, stream: stream, hash: h}
}

// read reads the next frame into buf (grown if needed) and checks its header and sequence
// number. It returns io.EOF, unwrapped, when the stream ends cleanly between frames; other
// errors are *FrameError or the transport's. The frame returned aliases buf, which needs
// room for the frame plus a header: whatever part of the next header arrived with the
// frame's body is kept for the next call.
func (r *frameReader) read(buf []byte) (header, []byte, error) {
	if r.ahead < headerSize {
		n, err := io.ReadFull(r.r, r.hdr[r.ahead:])
		r.ahead += n
		if err != nil {
			if r.ahead > 0 && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
				return header{}, nil, r.errorf(header{}, ErrTruncatedFrame)
			}
			return header{}, nil, err
		}
	}
	r.ahead = 0
	h, err := decodeHeader(r.hdr[:])
	if err != nil {
		return h, nil, r.errorf(h, err)
	}
	switch {
	case h.stream != r.stream:
		return h, nil, r.errorf(h, fmt.Errorf("%w: names stream %d", ErrMisroutedFrame, h.stream))
	case h.seq < r.seq:
		return h, nil, r.errorf(h, fmt.Errorf("%w: sequence %d", ErrReplayedFrame, h.seq))
	case h.seq > r.seq:
		return h, nil, r.errorf(h, fmt.Errorf("%w: sequence %d", ErrReorderedFrame, h.seq))
	}
	n := headerSize + int(h.length)
	buf = grow(buf, n+headerSize)
	copy(buf, r.hdr[:])
	got, err := io.ReadAtLeast(r.r, buf[headerSize:n+headerSize], n-headerSize)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return h, nil, r.errorf(h, ErrTruncatedFrame)
		}
		return h, nil, err
	}
	r.ahead = copy(r.hdr[:], buf[n:headerSize+got])
	r.seq++
	return h, buf[:n], nil
}

// open authenticates frame (as returned by read) and appends its plaintext to dst.
func (r *frameReader) open(dst []byte, h header, frame []byte) ([]byte, error) {
	binary.BigEndian.PutUint64(r.nonce[4:], h.seq)
	pt, err := r.aead.Open(dst, r.nonce[:], frame[headerSize:], frame[:headerSize])
	if err != nil {
		return nil, &FrameError{Stream: r.stream, Seq: h.seq, Type: h.typ.String(), Err: ErrFrameAuthentication}
	}
	if h.typ != frameFin {
		r.account(h, frame, len(pt))
	}
	return pt, nil
}

func (r *frameReader) account(h header, frame []byte, n int) {
	r.hash.Write(frame[:headerSize])
	r.hash.Write(frame[len(frame)-tagSize:])
	r.counts.frames++
	switch h.typ {
	case framePages:
		r.counts.pages += uint64(h.pages)
	case frameZeroPages:
		r.counts.zeroPages += uint64(h.pages)
	case frameData:
		r.counts.dataBytes += uint64(n)
	}
}

// checkFin compares a FIN payload's counts and transcript hash with what was received before
// it, then accounts the FIN. The memory digest it carries is checked by the destination
// against the memory root of its region once every stream has ended.
func (r *frameReader) checkFin(h header, frame, payload []byte) error {
	want := finPayload(make([]byte, 0, finSize), r.counts, payload[finDigestAt:finDigestAt+sha256.Size], r.hash)
	if string(want) != string(payload) {
		return &FrameError{Stream: r.stream, Seq: h.seq, Type: h.typ.String(), Err: fmt.Errorf("%w: FIN counts or transcript hash differ", ErrIncomplete)}
	}
	r.account(h, frame, 0)
	return nil
}

func (r *frameReader) errorf(h header, err error) error {
	t := ""
	if h.typ != frameMarker {
		t = h.typ.String()
	}
	return &FrameError{Stream: r.stream, Seq: r.seq, Type: t, Err: err}
}

func grow(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}
