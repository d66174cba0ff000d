package migagent

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"
)

// The byte stream a libvirt migration carries over the data plane is a sequence of tunnel
// records, each a type byte, a 4-byte big-endian payload length and the payload. Besides the
// hypervisor's own migration stream it carries the steps' cookies between the agents, so that
// nothing of the migration but the data plane's ciphertext leaves the hosts and the broker
// forwards nothing new. In order, from the source (s) and the destination (d):
//
//	s→d  offer      the libvirt.Offer of Begin, JSON
//	d→s  accepted   the cookie of Prepare
//	s↔d  data…      the hypervisors' migration stream, both ways
//	s↔d  end        a hypervisor closed its sending side (half-close)
//	s→d  performed  the cookie of Perform: the stream is complete, the guest paused at the source
//	d→s  finished   the cookie of Finish: the guest runs at the destination
//
// after which each side ends its direction of the byte stream. The records travel inside the
// data plane's sealed frames: they are as trusted as the attested peer that holds TK.
const (
	recOffer     byte = 'O'
	recAccepted  byte = 'A'
	recData      byte = 'D'
	recEnd       byte = 'E'
	recPerformed byte = 'P'
	recFinished  byte = 'F'
)

// maxRecord bounds a record's payload: domain XML and cookies are a few KiB, data records
// are at most dataChunk.
const maxRecord = 1 << 20

// dataChunk is the most hypervisor bytes put in one data record.
const dataChunk = 256 << 10

// errTunnelClosed is what the driver sees once the data plane closed the tunnel.
var errTunnelClosed = errors.New("data plane closed the tunnel")

// tunnel joins the data plane (migagent's Stream: it reads what to send, writes what was
// received, and passes the peer's half-close through CloseWrite) and the agent's libvirt
// driver (send and recv records). Both sides block on each other: the hypervisor is slowed
// down to what the data plane carries.
type tunnel struct {
	outR *io.PipeReader // the data plane reads what the driver sends
	outW *io.PipeWriter
	inR  *io.PipeReader // the driver reads what the data plane received
	inW  *io.PipeWriter
	rd   *bufio.Reader
	data []byte // the memory of received data records, reused
	wmu  sync.Mutex

	lmu    sync.Mutex
	lanes  []*hvLane // lane i is lanes[i-1]
	source bool      // the source's end: its lanes only send
}

// newTunnel makes the tunnel of one migration, at the source or at the destination.
func newTunnel(source bool) *tunnel {
	t := &tunnel{source: source}
	t.outR, t.outW = io.Pipe()
	t.inR, t.inW = io.Pipe()
	t.rd = bufio.NewReaderSize(t.inR, 64<<10)
	return t
}

// Read gives the data plane the next bytes to send; io.EOF once the driver ended its
// direction.
func (t *tunnel) Read(p []byte) (int, error) { return t.outR.Read(p) }

// Write hands the driver bytes the data plane received.
func (t *tunnel) Write(p []byte) (int, error) { return t.inW.Write(p) }

// CloseWrite passes the peer's end of stream on to the driver.
func (t *tunnel) CloseWrite() error { return t.inW.Close() }

// Close is the data plane giving up: the driver's pending and later calls fail.
func (t *tunnel) Close() error {
	t.inW.CloseWithError(errTunnelClosed)
	t.outR.CloseWithError(errTunnelClosed)
	return nil
}

// send writes one record.
func (t *tunnel) send(typ byte, payload []byte) error {
	if len(payload) > maxRecord {
		return fmt.Errorf("sending tunnel record %q: %d bytes", typ, len(payload))
	}
	rec := make([]byte, recordHeader+len(payload))
	copy(rec[recordHeader:], payload)
	return t.write(typ, rec)
}

// recordHeader is the size of a record's type and length.
const recordHeader = 5

// write fills in the header of rec, a record with its payload after recordHeader bytes,
// and writes it whole: the data plane then reads a record in one piece, not its header in
// a frame of its own.
func (t *tunnel) write(typ byte, rec []byte) error {
	rec[0] = typ
	binary.BigEndian.PutUint32(rec[1:recordHeader], uint32(len(rec)-recordHeader))
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if _, err := t.outW.Write(rec); err != nil {
		return fmt.Errorf("sending tunnel record: %w", err)
	}
	return nil
}

// recv reads one record. It returns io.EOF at a clean end of the peer's direction, and
// io.ErrUnexpectedEOF for a record cut short. A data record's payload is valid only until
// the next recv.
func (t *tunnel) recv() (byte, []byte, error) {
	typ, p, err := readRecord(t.rd, t.data)
	if typ == recData {
		t.data = p[:0]
	}
	return typ, p, err
}

// readRecord reads one record from r; a data record's payload goes in buf's memory when it
// fits.
func readRecord(r io.Reader, buf []byte) (byte, []byte, error) {
	var hdr [recordHeader]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil, io.EOF
		}
		return 0, nil, fmt.Errorf("reading tunnel record: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	switch hdr[0] {
	case recOffer, recAccepted, recData, recEnd, recPerformed, recFinished:
	default:
		return 0, nil, fmt.Errorf("reading tunnel record: unknown type %#x", hdr[0])
	}
	if n > maxRecord {
		return 0, nil, fmt.Errorf("reading tunnel record %q: %d bytes is too long", hdr[0], n)
	}
	var p []byte
	if hdr[0] == recData && int(n) <= cap(buf) {
		p = buf[:n]
	} else {
		p = make([]byte, n)
	}
	if _, err := io.ReadFull(r, p); err != nil {
		return 0, nil, fmt.Errorf("reading tunnel record %q: %w", hdr[0], noEOF(err))
	}
	return hdr[0], p, nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// expect reads one record and checks its type.
func (t *tunnel) expect(typ byte) ([]byte, error) {
	got, p, err := t.recv()
	if err != nil {
		return nil, noEOF(err)
	}
	if got != typ {
		return nil, fmt.Errorf("reading tunnel record: got %q, want %q", got, typ)
	}
	return p, nil
}

// end ends the driver's direction: cleanly with a nil err (the data plane half-closes),
// after the record being written, else with err (the data plane fails the migration and
// tells the peer) at once. A failure does not wait for the write lock: a write blocked on a
// data plane that no longer reads (its handshake refused) holds it until the pipe closes.
func (t *tunnel) end(err error) {
	if err == nil {
		t.wmu.Lock()
		defer t.wmu.Unlock()
		t.outW.Close()
		return
	}
	t.outW.CloseWithError(err)
	t.inR.CloseWithError(err)
	t.closeLanes()
}

// pumpHypervisor sends what the hypervisor writes on hv as data records and an end record
// at its end of stream.
func (t *tunnel) pumpHypervisor(hv net.Conn) error {
	rec := make([]byte, recordHeader+dataChunk)
	for {
		n, err := hv.Read(rec[recordHeader:])
		if n > 0 {
			if serr := t.write(recData, rec[:recordHeader+n]); serr != nil {
				return serr
			}
		}
		if errors.Is(err, io.EOF) {
			return t.send(recEnd, nil)
		}
		if err != nil {
			return fmt.Errorf("reading the hypervisor's migration stream: %w", err)
		}
	}
}

// toHypervisor writes a data record to hv, or passes an end record on as a half-close. It
// reports whether rec was one of those.
func toHypervisor(hv net.Conn, typ byte, p []byte) (bool, error) {
	switch typ {
	case recData:
		if _, err := hv.Write(p); err != nil {
			return true, fmt.Errorf("writing the hypervisor's migration stream: %w", err)
		}
		return true, nil
	case recEnd:
		if cw, ok := hv.(interface{ CloseWrite() error }); ok {
			if err := cw.CloseWrite(); err != nil {
				return true, fmt.Errorf("half-closing the hypervisor's migration stream: %w", err)
			}
		}
		return true, nil
	}
	return false, nil
}

// A hypervisor that migrates over several connections (QEMU's multifd channels, beside its
// main one) gets one lane per extra connection: a data-plane stream of its own
// (dataplane.SourceConfig.Lanes), which carries that connection's bytes as they are, with
// no records. The lanes exist from the start of the data plane's session; each waits for
// the agent to attach its hypervisor connection, which the source accepts and the
// destination dials after the main one. Only the main connection must come first (QEMU
// takes the first for its main channel); the channels connect in any order among
// themselves, and each names itself in its first packet, so lane i need not carry
// channel i.

// hvLane is the local end of one lane: a hypervisor connection, once attached.
type hvLane struct {
	ready chan struct{} // closed by attach or Close
	once  sync.Once
	conn  net.Conn // set before ready is closed; nil if the lane was closed first
	// eof is closed when the hypervisor has ended its side (Read returned io.EOF), closed
	// when the lane was closed.
	eof, closed       chan struct{}
	eofOnce, shutOnce sync.Once
	// sendOnly refuses what the peer sends on the lane: QEMU's multifd channels carry
	// nothing from the destination to the source, so at the source nothing may be written
	// to them (the hypervisor would not read it, and the writer would wait for ever).
	sendOnly bool
}

func newHVLane(sendOnly bool) *hvLane {
	return &hvLane{ready: make(chan struct{}), eof: make(chan struct{}), closed: make(chan struct{}), sendOnly: sendOnly}
}

// attach gives the lane its hypervisor connection; a lane already closed closes it.
func (l *hvLane) attach(c net.Conn) {
	attached := false
	l.once.Do(func() {
		l.conn, attached = c, true
		close(l.ready)
	})
	if !attached {
		c.Close()
	}
}

func (l *hvLane) get() (net.Conn, error) {
	<-l.ready
	if l.conn == nil {
		return nil, errTunnelClosed
	}
	return l.conn, nil
}

// Read gives the data plane what the hypervisor sent on the connection.
func (l *hvLane) Read(p []byte) (int, error) {
	c, err := l.get()
	if err != nil {
		return 0, err
	}
	n, err := c.Read(p)
	if errors.Is(err, io.EOF) {
		l.eofOnce.Do(func() { close(l.eof) })
	}
	return n, err
}

// errLaneSendOnly is what the peer gets for writing on a lane that carries nothing back.
var errLaneSendOnly = errors.New("a multifd channel carries nothing back to the source")

// Write hands the hypervisor what the data plane received for it.
func (l *hvLane) Write(p []byte) (int, error) {
	if l.sendOnly {
		return 0, errLaneSendOnly
	}
	c, err := l.get()
	if err != nil {
		return 0, err
	}
	return c.Write(p)
}

// finish waits up to timeout for the hypervisor to end its side of the lane, as it does
// once the migration completed, and otherwise ends it for it (shutting the connection for
// reading), so that the data plane reads the lane's end either way.
func (l *hvLane) finish(timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-l.eof:
		return
	case <-l.closed:
		return
	case <-t.C:
	}
	if c, err := l.get(); err == nil {
		if cr, ok := c.(interface{ CloseRead() error }); ok {
			_ = cr.CloseRead()
		}
	}
}

// CloseWrite passes the peer's end of the lane on to the hypervisor.
func (l *hvLane) CloseWrite() error {
	c, err := l.get()
	if err != nil {
		return err
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close closes the connection, or the lane before any was attached.
func (l *hvLane) Close() error {
	l.once.Do(func() { close(l.ready) })
	l.shutOnce.Do(func() { close(l.closed) })
	if l.conn != nil {
		return l.conn.Close()
	}
	return nil
}

// lane is dataplane's Lanes: the local end of lane i, from 1.
func (t *tunnel) lane(i int) io.ReadWriteCloser { return t.hvLane(i) }

// finishLanes ends every lane whose hypervisor does not end it within endTimeout (see
// hvLane.finish); it returns at once and does the waiting in the background.
func (t *tunnel) finishLanes() {
	for _, l := range t.hvLanes() {
		go l.finish(endTimeout)
	}
}

// hvLane is lane i, from 1, made on first use.
func (t *tunnel) hvLane(i int) *hvLane {
	t.lmu.Lock()
	defer t.lmu.Unlock()
	for len(t.lanes) < i {
		t.lanes = append(t.lanes, newHVLane(t.source))
	}
	return t.lanes[i-1]
}

// hvLanes are the lanes the data plane's session carries (none before it started).
func (t *tunnel) hvLanes() []*hvLane {
	t.lmu.Lock()
	defer t.lmu.Unlock()
	return slices.Clone(t.lanes)
}

// closeLanes closes every lane's connection.
func (t *tunnel) closeLanes() {
	for _, l := range t.hvLanes() {
		l.Close()
	}
}
