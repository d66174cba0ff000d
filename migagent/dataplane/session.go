package dataplane

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

type role uint8

const (
	roleSource role = iota + 1
	roleDestination
)

// defaultDepth is the number of frame buffers per stream and direction: one being sealed
// or opened, one on the socket, one queued.
const defaultDepth = 3

// sendJob is one request to a stream's sealer.
type sendJob struct {
	typ   frameType
	first uint64 // first page, or byte offset
	pages uint32
	data  []byte
	// done is closed when data may be reused (frameData) or when the frame, or the marker,
	// has been written to the connection (every other type).
	done chan struct{}
}

type frameBuf struct {
	b     []byte
	h     header
	frame []byte
	eof   bool
}

type outItem struct {
	buf  *frameBuf
	done chan struct{}
}

type finRecord struct {
	stream int
	hash   []byte
	digest []byte // the source's memory digest
}

// session is an established transport: N streams, each with a sealer and a writer for its
// outbound direction and a reader and an opener for its inbound one.
type session struct {
	role       role
	transcript []byte
	streams    []*stream
	log        *slog.Logger

	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	failOnce sync.Once
	failing  atomic.Bool
	tornDown chan struct{}
	closing  atomic.Bool

	// Inbound dispatch.
	region    *Region
	digests   *chunkDigests // of the pages sent (source) or written (destination); nil without a region
	received  []uint64      // destination: pages received at least once
	zeroPages bool
	// lanes are the local ends of the byte streams, by stream index: the byte stream on
	// stream 0 and, with lanes, one on each further stream; nil where none.
	lanes   []*lane
	onPages func(n int)
	fins    chan finRecord
	acks    chan []byte

	mem atomic.Int64 // bytes of frame buffers, and of byte-stream read buffers, allocated
	// queued counts the pages handed to the streams to send (source), for progress within a
	// round; zeroSent those of them sent as zero-page flags, which cost no payload.
	queued   atomic.Int64
	zeroSent atomic.Int64
}

type stream struct {
	s     *session
	index uint32
	conn  net.Conn

	w     *frameWriter
	jobs  chan sendJob
	out   chan outItem
	free  chan *frameBuf
	nsend int

	r       *frameReader
	rout    chan *frameBuf
	rfree   chan *frameBuf
	nrecv   int
	finSeen bool
	ended   chan struct{}
	sendOff uint64 // owned by the sealer
	finHash []byte // set by the sealer before its FIN is written
	recvOff uint64 // owned by the opener
	// hashes carries to the hasher, in order, the pages the sealer has sent (source) or the
	// opener has written (destination); the hasher alone uses cursor.
	hashes chan hashJob
	cursor chunkCursor
}

type sessionConfig struct {
	role role
	// secret is the session secret the handshake established (confirmed.secret); the
	// caller destroys it once newSession returns.
	secret     *SecretKey
	transcript []byte
	conns      []net.Conn
	region     *Region
	zeroPages  bool
	local      io.ReadWriteCloser
	// lanes gives the byte stream carried on each stream after the first; nil means only
	// stream 0 carries one.
	lanes   func(i int) io.ReadWriteCloser
	onPages func(n int)
	log     *slog.Logger
}

// lane is the local end of the byte stream one stream carries.
type lane struct {
	rw         io.ReadWriteCloser
	closeWrite func() error // rw's CloseWrite, nil if it has none
	peerClosed chan struct{}
}

// ended reports whether the peer has half-closed the lane.
func (l *lane) ended() bool {
	select {
	case <-l.peerClosed:
		return true
	default:
		return false
	}
}

func newLane(rw io.ReadWriteCloser) *lane {
	l := &lane{rw: rw, peerClosed: make(chan struct{})}
	if cw, ok := rw.(interface{ CloseWrite() error }); ok {
		l.closeWrite = cw.CloseWrite
	}
	return l
}

// newSession derives the stream keys from the session secret and starts the streams.
// Cancelling ctx fails the session.
func newSession(ctx context.Context, cfg sessionConfig) (*session, error) {
	s := &session{
		role:       cfg.role,
		transcript: cfg.transcript,
		log:        cfg.log,
		region:     cfg.region,
		zeroPages:  cfg.zeroPages,
		onPages:    cfg.onPages,
		tornDown:   make(chan struct{}),
		fins:       make(chan finRecord, len(cfg.conns)),
		acks:       make(chan []byte, 1),
	}
	if cfg.local != nil {
		s.lanes = make([]*lane, len(cfg.conns))
		s.lanes[0] = newLane(cfg.local)
		for i := 1; i < len(s.lanes) && cfg.lanes != nil; i++ {
			s.lanes[i] = newLane(cfg.lanes(i))
		}
	}
	if s.region != nil {
		s.digests = newChunkDigests(s.region)
		if s.role == roleDestination {
			s.received = make([]uint64, (s.region.Pages()+63)/64)
		}
	}
	outDir, inDir := sourceToDestination, destinationToSource
	if s.role == roleDestination {
		outDir, inDir = inDir, outDir
	}
	for i, conn := range cfg.conns {
		seal, err := streamAEAD(cfg.secret, outDir, uint32(i))
		if err != nil {
			return nil, fmt.Errorf("deriving stream %d key: %w", i, err)
		}
		open, err := streamAEAD(cfg.secret, inDir, uint32(i))
		if err != nil {
			return nil, fmt.Errorf("deriving stream %d key: %w", i, err)
		}
		s.streams = append(s.streams, &stream{
			s:      s,
			index:  uint32(i),
			conn:   conn,
			w:      newFrameWriter(seal, uint32(i), cfg.transcript),
			jobs:   make(chan sendJob, 64),
			out:    make(chan outItem, defaultDepth),
			free:   make(chan *frameBuf, defaultDepth),
			r:      newFrameReader(conn, open, uint32(i), cfg.transcript),
			rout:   make(chan *frameBuf, defaultDepth),
			rfree:  make(chan *frameBuf, defaultDepth),
			ended:  make(chan struct{}),
			hashes: make(chan hashJob, 4*defaultDepth),
			cursor: chunkCursor{digests: s.digests, chunk: -1},
		})
	}
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	for _, st := range s.streams {
		s.wg.Add(5)
		go st.hasher()
		go st.sealer()
		go st.writer()
		go st.reader()
		go st.opener()
	}
	context.AfterFunc(ctx, func() {
		s.fail(fmt.Errorf("migration ended: %w", context.Cause(ctx)), true)
	})
	return s, nil
}

// fail ends the session with err unless it is already ending. If tell, it first tries to
// send the peer an abort frame saying why.
func (s *session) fail(err error, tell bool) {
	if s.closing.Load() {
		return
	}
	s.failOnce.Do(func() {
		s.log.Debug("Migration transport failed", "error", err)
		s.failing.Store(true)
		go s.teardown(err, tell)
	})
}

// teardown ends a failed session. If tell, it sends the peer an abort frame on stream 0,
// half-closes stream 0 and drains every connection for a moment, so that the peer reads the
// abort before any reset.
func (s *session) teardown(err error, tell bool) {
	defer close(s.tornDown)
	if !tell {
		s.cancel(err)
		s.closeConns()
		return
	}
	reason := err.Error()
	if len(reason) > maxAbortLen {
		reason = reason[:maxAbortLen]
	}
	job := sendJob{typ: frameAbort, data: []byte(reason), done: make(chan struct{})}
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case s.streams[0].jobs <- job:
		select {
		case <-job.done:
		case <-t.C:
		}
	default:
	}
	s.cancel(err)
	var wg sync.WaitGroup
	for i, st := range s.streams {
		wg.Go(func() {
			if cw, ok := st.conn.(interface{ CloseWrite() error }); ok && i == 0 {
				_ = cw.CloseWrite()
			}
			_ = st.conn.SetReadDeadline(time.Now().Add(time.Second))
			_, _ = io.Copy(io.Discard, st.conn)
		})
	}
	wg.Wait()
	s.closeConns()
}

func (s *session) closeConns() {
	for _, st := range s.streams {
		_ = st.conn.Close()
	}
	if s.ctx.Err() != nil {
		for _, l := range s.lanes {
			if l != nil {
				_ = l.rw.Close()
			}
		}
	}
}

// err returns why the session failed.
func (s *session) err() error { return context.Cause(s.ctx) }

// close ends a session that completed: later errors are ignored.
func (s *session) close() {
	s.closing.Store(true)
	if s.failing.Load() {
		<-s.tornDown
	}
	s.closeConns()
	s.cancel(errors.New("session closed"))
	s.wg.Wait()
}

// submit queues job on stream i.
func (s *session) submit(i int, job sendJob) error {
	select {
	case s.streams[i].jobs <- job:
		return nil
	case <-s.ctx.Done():
		return s.err()
	}
}

// wait waits for done or the end of the session.
func (s *session) wait(done chan struct{}) error {
	select {
	case <-done:
		return nil
	case <-s.ctx.Done():
		return s.err()
	}
}

// flush waits until everything queued on every stream so far is written.
func (s *session) flush() error {
	dones := make([]chan struct{}, len(s.streams))
	for i := range s.streams {
		dones[i] = make(chan struct{})
		if err := s.submit(i, sendJob{typ: frameMarker, done: dones[i]}); err != nil {
			return err
		}
	}
	for _, d := range dones {
		if err := s.wait(d); err != nil {
			return err
		}
	}
	return nil
}

// sendPageSet sends every page whose bit is set in set, each on its chunk's stream, and
// returns once all of them are written.
func (s *session) sendPageSet(set []uint64) error {
	n := len(s.streams)
	errs := make(chan error, n)
	for i := range n {
		go func() {
			errs <- s.producePages(i, set)
		}()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	return s.flush()
}

func (s *session) producePages(i int, set []uint64) error {
	pages := s.region.Pages()
	const wordsPerChunk = chunkPages / 64
	for c := i; c*chunkPages < pages; c += len(s.streams) {
		base := c * chunkPages
		run, runStart := 0, 0
		for w := range wordsPerChunk {
			wi := c*wordsPerChunk + w
			if wi >= len(set) {
				break
			}
			word := set[wi]
			for b := range 64 {
				p := base + w*64 + b
				if word&(1<<b) != 0 && p < pages {
					if run == 0 {
						runStart = p
					}
					run++
					continue
				}
				if run > 0 {
					if err := s.submit(i, sendJob{typ: framePages, first: uint64(runStart), pages: uint32(run)}); err != nil {
						return err
					}
					s.queued.Add(int64(run))
					run = 0
				}
			}
		}
		if run > 0 {
			if err := s.submit(i, sendJob{typ: framePages, first: uint64(runStart), pages: uint32(run)}); err != nil {
				return err
			}
			s.queued.Add(int64(run))
		}
	}
	return nil
}

// sendFins ends every stream's outbound direction with a FIN carrying the memory digest and
// waits until they are written.
func (s *session) sendFins(digest []byte) error {
	dones := make([]chan struct{}, len(s.streams))
	for i := range s.streams {
		dones[i] = make(chan struct{})
		if err := s.submit(i, sendJob{typ: frameFin, data: digest, done: dones[i]}); err != nil {
			return err
		}
	}
	for _, d := range dones {
		if err := s.wait(d); err != nil {
			return err
		}
	}
	return nil
}

// commitTranscript hashes the handshake transcript and every stream's FIN hash.
func (s *session) commitTranscript(fins []finRecord) []byte {
	h := sha256.New()
	h.Write([]byte(commitInfo))
	h.Write(s.transcript)
	for _, f := range fins {
		h.Write(f.hash)
	}
	return h.Sum(nil)
}

// pumpLanes copies every local byte stream to the peer, each on its own stream; the
// channel it returns is closed when all of them have ended (at once without byte streams).
func (s *session) pumpLanes() <-chan struct{} {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i, l := range s.lanes {
		if l != nil {
			wg.Go(func() { s.pumpOut(i, l.rw) })
		}
	}
	go func() {
		wg.Wait()
		close(done)
	}()
	return done
}

// pumpDepth is how many reads of a local byte stream may wait to be sealed: the next read
// goes on while earlier ones are sealed, so the local writer (a hypervisor, whose socket
// buffer is small) is not held up by the sealing.
const pumpDepth = 4

// pumpOut copies one local byte stream to the peer on stream i, then half-closes.
func (s *session) pumpOut(i int, local io.Reader) {
	var (
		bufs  [pumpDepth][]byte
		dones [pumpDepth]chan struct{}
	)
	for k := 0; ; k = (k + 1) % pumpDepth {
		if dones[k] != nil && s.wait(dones[k]) != nil {
			return // the buffer is free again once its frame is sealed
		}
		if bufs[k] == nil {
			bufs[k] = make([]byte, MaxPayload)
			s.mem.Add(MaxPayload)
		}
		buf := bufs[k]
		n, err := local.Read(buf)
		dones[k] = nil
		if n > 0 {
			dones[k] = make(chan struct{})
			if s.submit(i, sendJob{typ: frameData, data: buf[:n], done: dones[k]}) != nil {
				return
			}
		}
		if errors.Is(err, io.EOF) {
			done := make(chan struct{})
			if s.submit(i, sendJob{typ: frameCloseWrite, done: done}) == nil {
				_ = s.wait(done)
			}
			return
		}
		if err != nil {
			s.fail(fmt.Errorf("reading local byte stream %d: %w", i, err), true)
			return
		}
	}
}

// peerClosedAll waits until the peer has ended every byte stream it sends.
func (s *session) peerClosedAll() error {
	for _, l := range s.lanes {
		if l != nil {
			if err := s.wait(l.peerClosed); err != nil {
				return err
			}
		}
	}
	return nil
}

// peerClosedEach reports whether the peer has ended every byte stream it sends.
func (s *session) peerClosedEach() bool {
	for _, l := range s.lanes {
		if l != nil && !l.ended() {
			return false
		}
	}
	return true
}

// lane is the local end of the byte stream stream i carries, nil if none.
func (s *session) lane(i uint32) *lane {
	if int(i) < len(s.lanes) {
		return s.lanes[i]
	}
	return nil
}

// --- per-stream goroutines ---

func (st *stream) sendBuf() *frameBuf {
	select {
	case b := <-st.free:
		return b
	default:
	}
	if st.nsend < defaultDepth {
		st.nsend++
		return &frameBuf{}
	}
	select {
	case b := <-st.free:
		return b
	case <-st.s.ctx.Done():
		return nil
	}
}

// emit seals one frame and hands it to the writer.
func (st *stream) emit(typ frameType, first uint64, pages uint32, pt []byte, done chan struct{}) bool {
	buf := st.sendBuf()
	if buf == nil {
		return false
	}
	before := cap(buf.b)
	buf.frame = st.w.seal(buf.b, typ, first, pages, pt)
	buf.b = buf.frame[:cap(buf.frame)]
	if c := cap(buf.b); c != before {
		st.s.mem.Add(int64(c - before))
	}
	select {
	case st.out <- outItem{buf: buf, done: done}:
		return true
	case <-st.s.ctx.Done():
		return false
	}
}

func (st *stream) sealer() {
	defer st.s.wg.Done()
	s := st.s
	var scratch []byte
	for {
		var job sendJob
		select {
		case job = <-st.jobs:
		case <-s.ctx.Done():
			return
		}
		ok := true
		switch job.typ {
		case frameMarker:
			// Everything queued before the marker is sent once the marker is written, and
			// hashed once the hasher has settled: the round's digests are final unless a
			// later round sends the pages again.
			if !st.settleDigests() {
				return
			}
			select {
			case st.out <- outItem{done: job.done}:
			case <-s.ctx.Done():
				ok = false
			}
		case framePages:
			ok = st.sealPages(job.first, job.pages)
		case frameData:
			ok = st.emit(frameData, st.sendOff, 0, job.data, nil)
			st.sendOff += uint64(len(job.data))
			close(job.done)
		case frameCloseWrite:
			ok = st.emit(frameCloseWrite, st.sendOff, 0, nil, job.done)
		case frameFin:
			scratch = st.w.fin(scratch[:0], job.data)
			st.finHash = append([]byte(nil), scratch[finSize-sha256.Size:]...)
			ok = st.emit(frameFin, 0, 0, scratch, job.done)
		default:
			ok = st.emit(job.typ, 0, 0, job.data, job.done)
		}
		if !ok {
			return
		}
	}
}

// sealPages seals pages [first, first+n), as zero-page flags where allowed.
// Each page's digest is then set from the region: if the page changed since it was sealed,
// it is dirty and will be sent, and hashed, again.
func (st *stream) sealPages(first uint64, n uint32) bool {
	r := st.s.region
	if !st.s.zeroPages {
		return st.emit(framePages, first, n, r.pageRange(int(first), int(n)), nil) &&
			st.hashPages(hashJob{first: int(first), n: int(n)})
	}
	start, startZero := uint32(0), isZero(r.Page(int(first)))
	for k := uint32(1); k <= n; k++ {
		z := false
		if k < n {
			z = isZero(r.Page(int(first + uint64(k))))
		}
		if k < n && z == startZero {
			continue
		}
		runFirst, runN := first+uint64(start), k-start
		if startZero {
			if !st.emit(frameZeroPages, runFirst, runN, nil, nil) || !st.hashPages(hashJob{first: int(runFirst), n: int(runN), zero: true}) {
				return false
			}
			st.s.zeroSent.Add(int64(runN))
		} else {
			if !st.emit(framePages, runFirst, runN, r.pageRange(int(runFirst), int(runN)), nil) || !st.hashPages(hashJob{first: int(runFirst), n: int(runN)}) {
				return false
			}
		}
		start, startZero = k, z
	}
	return true
}

// hashJob asks a stream's hasher to set the digests of pages [first, first+n), zero pages if
// zero, or, with done, to settle its chunk digests and close done.
type hashJob struct {
	first, n int
	zero     bool
	done     chan struct{}
}

// hashPages queues the hashing of pages just sent or written. It returns false if the
// session ended.
func (st *stream) hashPages(j hashJob) bool {
	select {
	case st.hashes <- j:
		return true
	case <-st.s.ctx.Done():
		return false
	}
}

// settleDigests waits until the hasher has hashed every page queued so far and settled the
// chunk digests. It returns false if the session ended.
func (st *stream) settleDigests() bool {
	done := make(chan struct{})
	if !st.hashPages(hashJob{done: done}) {
		return false
	}
	select {
	case <-done:
		return true
	case <-st.s.ctx.Done():
		return false
	}
}

// hasher sets page and chunk digests, in the order the pages were sent or written, beside
// the sealer or opener so that hashing does not hold up the stream. A page's digest is set
// after it was sealed (source: if the page changed since, it is dirty and will be sent, and
// hashed, again) or written (destination: the last write of a page is followed by its last
// hash, since jobs are in order).
func (st *stream) hasher() {
	defer st.s.wg.Done()
	d := st.s.digests
	for {
		var j hashJob
		select {
		case j = <-st.hashes:
		case <-st.s.ctx.Done():
			return
		}
		switch {
		case j.done != nil:
			st.cursor.settle()
			close(j.done)
		case j.zero:
			st.cursor.touch(j.first, j.n)
			d.zeroPages(j.first, j.n)
		default:
			st.cursor.touch(j.first, j.n)
			d.hashPages(j.first, j.n)
		}
	}
}

func (st *stream) writer() {
	defer st.s.wg.Done()
	s := st.s
	for {
		var it outItem
		select {
		case it = <-st.out:
		case <-s.ctx.Done():
			return
		}
		if it.buf != nil {
			if _, err := st.conn.Write(it.buf.frame); err != nil {
				s.fail(fmt.Errorf("writing stream %d: %w", st.index, err), false)
				return
			}
			st.free <- it.buf
		}
		if it.done != nil {
			close(it.done)
		}
	}
}

func (st *stream) reader() {
	defer st.s.wg.Done()
	s := st.s
	for {
		var buf *frameBuf
		select {
		case buf = <-st.rfree:
		default:
			if st.nrecv < defaultDepth {
				st.nrecv++
				buf = &frameBuf{}
			} else {
				select {
				case buf = <-st.rfree:
				case <-s.ctx.Done():
					return
				}
			}
		}
		before := cap(buf.b)
		h, frame, err := st.r.read(buf.b)
		if frame != nil {
			buf.b = frame[:cap(frame)]
			if c := cap(buf.b); c != before {
				s.mem.Add(int64(c - before))
			}
		}
		if err != nil {
			if s.closing.Load() || s.ctx.Err() != nil {
				return
			}
			if errors.Is(err, io.EOF) {
				buf.eof = true
				select {
				case st.rout <- buf:
				case <-s.ctx.Done():
				}
				return
			}
			var fe *FrameError
			if errors.As(err, &fe) {
				s.fail(err, true)
			} else {
				s.fail(fmt.Errorf("reading stream %d: %w", st.index, err), false)
			}
			return
		}
		buf.h, buf.frame = h, frame
		select {
		case st.rout <- buf:
		case <-s.ctx.Done():
			return
		}
	}
}

func (st *stream) opener() {
	defer st.s.wg.Done()
	s := st.s
	for {
		var buf *frameBuf
		select {
		case buf = <-st.rout:
		case <-s.ctx.Done():
			return
		}
		if buf.eof {
			if st.finSeen {
				close(st.ended)
				return
			}
			if s.role == roleDestination {
				s.fail(&FrameError{Stream: st.index, Seq: st.r.seq, Err: fmt.Errorf("%w: stream ended before its FIN", ErrTruncatedFrame)}, false)
			} else {
				s.fail(&FrameError{Stream: st.index, Seq: st.r.seq, Err: fmt.Errorf("%w: connection closed before the commit acknowledgement", ErrTruncatedFrame)}, false)
			}
			return
		}
		if err := st.dispatch(buf.h, buf.frame); err != nil {
			s.fail(err, !errors.Is(err, ErrPeerAborted))
			return
		}
		st.rfree <- buf
	}
}

func (st *stream) frameErr(h header, err error) error {
	return &FrameError{Stream: st.index, Seq: h.seq, Type: h.typ.String(), Err: err}
}

// dispatch authenticates one frame and acts on it.
func (st *stream) dispatch(h header, frame []byte) error {
	s := st.s
	if st.finSeen {
		return st.frameErr(h, fmt.Errorf("%w: frame after FIN", ErrMalformedFrame))
	}
	inPlace := frame[headerSize:headerSize]
	switch h.typ {
	case framePages, frameZeroPages:
		if s.role != roleDestination || s.region == nil {
			return st.frameErr(h, fmt.Errorf("%w: no memory transfer in this direction", ErrMalformedFrame))
		}
		if h.typ == frameZeroPages && !s.zeroPages {
			return st.frameErr(h, ErrZeroPagesNotAllowed)
		}
		if h.offset+uint64(h.pages) > uint64(s.region.Pages()) {
			return st.frameErr(h, fmt.Errorf("%w: pages %d+%d beyond the region", ErrMalformedFrame, h.offset, h.pages))
		}
		if int((h.offset/chunkPages)%uint64(len(s.streams))) != int(st.index) {
			return st.frameErr(h, fmt.Errorf("%w: pages %d+%d belong to another stream", ErrMisroutedFrame, h.offset, h.pages))
		}
		dst := s.region.pageRange(int(h.offset), int(h.pages))
		if h.typ == framePages {
			if _, err := st.r.open(dst[:0:len(dst)], h, frame); err != nil {
				return err
			}
		} else {
			if _, err := st.r.open(inPlace, h, frame); err != nil {
				return err
			}
			clear(dst)
		}
		if !st.hashPages(hashJob{first: int(h.offset), n: int(h.pages), zero: h.typ == frameZeroPages}) {
			return s.err()
		}
		for p := h.offset; p < h.offset+uint64(h.pages); p++ {
			s.received[p/64] |= 1 << (p % 64)
		}
		if s.onPages != nil {
			s.onPages(int(h.pages))
		}
	case frameData:
		l := s.lane(st.index)
		if l == nil {
			return st.frameErr(h, fmt.Errorf("%w: no byte stream here", ErrMalformedFrame))
		}
		if l.ended() {
			return st.frameErr(h, fmt.Errorf("%w: data after close-write", ErrMalformedFrame))
		}
		if h.offset != st.recvOff {
			return st.frameErr(h, fmt.Errorf("%w: byte offset %d, want %d", ErrMalformedFrame, h.offset, st.recvOff))
		}
		pt, err := st.r.open(inPlace, h, frame)
		if err != nil {
			return err
		}
		st.recvOff += uint64(len(pt))
		if _, err := l.rw.Write(pt); err != nil {
			return fmt.Errorf("writing local byte stream %d: %w", st.index, err)
		}
	case frameCloseWrite:
		l := s.lane(st.index)
		if l == nil || l.ended() || h.offset != st.recvOff {
			return st.frameErr(h, fmt.Errorf("%w: unexpected close-write", ErrMalformedFrame))
		}
		if _, err := st.r.open(inPlace, h, frame); err != nil {
			return err
		}
		if l.closeWrite != nil {
			if err := l.closeWrite(); err != nil {
				return fmt.Errorf("half-closing local byte stream %d: %w", st.index, err)
			}
		}
		close(l.peerClosed)
	case frameFin:
		if s.role != roleDestination {
			return st.frameErr(h, fmt.Errorf("%w: FIN from the destination", ErrMalformedFrame))
		}
		pt, err := st.r.open(inPlace, h, frame)
		if err != nil {
			return err
		}
		if err := st.r.checkFin(h, frame, pt); err != nil {
			return err
		}
		st.finSeen = true
		if s.region != nil && !st.settleDigests() { // this stream writes no more pages
			return s.err()
		}
		s.fins <- finRecord{
			stream: int(st.index),
			hash:   append([]byte(nil), pt[finSize-sha256.Size:]...),
			digest: append([]byte(nil), pt[finDigestAt:finDigestAt+sha256.Size]...),
		}
	case frameAck:
		if s.role != roleSource || st.index != 0 {
			return st.frameErr(h, fmt.Errorf("%w: unexpected acknowledgement", ErrMalformedFrame))
		}
		pt, err := st.r.open(inPlace, h, frame)
		if err != nil {
			return err
		}
		select {
		case s.acks <- append([]byte(nil), pt...):
		default:
			return st.frameErr(h, fmt.Errorf("%w: second acknowledgement", ErrMalformedFrame))
		}
	case frameAbort:
		pt, err := st.r.open(inPlace, h, frame)
		if err != nil {
			return err
		}
		return fmt.Errorf("%w: %q", ErrPeerAborted, pt)
	}
	return nil
}
