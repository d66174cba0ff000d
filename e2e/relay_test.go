package e2e

import (
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
)

// relayMode is what a relay does to the data plane between two agents.
type relayMode int

const (
	// relayPass forwards every byte.
	relayPass relayMode = iota
	// relayTamper flips a bit in the payload of a pages frame.
	relayTamper
	// relayReorder swaps two pages frames.
	relayReorder
	// relayReplay sends a pages frame twice.
	relayReplay
	// relayTruncate sends half of a pages frame, then closes both connections.
	relayTruncate
	// relayMITM terminates both sides: it answers the source's hello with a handshake of its
	// own toward the destination (a fresh nonce), as a man in the middle without the transfer
	// key would have to.
	relayMITM
)

func (m relayMode) String() string {
	return [...]string{"pass", "tamper", "reorder", "replay", "truncate", "mitm"}[m]
}

// Handshake and frame layout of the data plane (migagent/handshake.go, frame.go).
const (
	hsPrefix     = 9 // magic (8) and message type
	hsHelloFixed = 1 + 2 + 4 + 8 + 32 + 1
	hsNonceAt    = hsPrefix + 1 + 2 + 4 + 8
	hsConfirm    = hsPrefix + 32
	hsJoin       = hsPrefix + 1 + 32
	frameHeader  = 32
	framePagesT  = 1
	// mutateAt is the pages frame of the first stream a mutating relay acts on.
	mutateAt = 3
)

// relay is a loopback TCP relay between a source agent and a destination agent's data-plane
// listener. It can hold the source's bytes after a limit (to keep a migration in its transfer
// phase), cut every connection, and tamper with frames.
type relay struct {
	t      testing.TB
	ln     net.Listener
	target string

	mu       sync.Mutex
	mode     relayMode
	conns    []net.Conn
	cut      bool
	limit    int64 // hold source bytes after this many; < 0: never
	sent     int64
	reached  chan struct{}
	release  chan struct{}
	accepted int
	mutated  bool
}

func startRelay(t testing.TB, listen, target string) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatalf("starting relay on %s: %v", listen, err)
	}
	r := &relay{t: t, ln: ln, target: target, limit: -1, reached: make(chan struct{}), release: make(chan struct{})}
	t.Cleanup(func() {
		ln.Close()
		r.Cut()
	})
	go r.serve()
	return r
}

// setMode sets what the relay does to connections accepted from now on.
func (r *relay) setMode(m relayMode) {
	r.mu.Lock()
	r.mode, r.accepted, r.mutated = m, 0, false
	r.mu.Unlock()
}

// hold makes the relay stop forwarding the source's bytes once n bytes went through, until
// Release; Reached is closed then.
func (r *relay) hold(n int64) {
	r.mu.Lock()
	r.limit, r.reached, r.release = n, make(chan struct{}), make(chan struct{})
	r.mu.Unlock()
}

// Reached is closed when the relay holds the source's bytes.
func (r *relay) Reached() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reached
}

// Release forwards the held bytes and everything after them.
func (r *relay) Release() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.limit = -1
	select {
	case <-r.release:
	default:
		close(r.release)
	}
}

// Cut closes every connection and refuses new ones until Restore: the network between the
// agents is gone.
func (r *relay) Cut() {
	r.mu.Lock()
	r.cut = true
	conns := r.conns
	r.conns = nil
	r.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	r.Release()
}

// Restore accepts connections again.
func (r *relay) Restore() {
	r.mu.Lock()
	r.cut = false
	r.mu.Unlock()
}

// Mutated reports whether a mutating relay has acted.
func (r *relay) Mutated() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mutated
}

func (r *relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cut {
		return false
	}
	r.conns = append(r.conns, c)
	return true
}

func (r *relay) serve() {
	for {
		src, err := r.ln.Accept()
		if err != nil {
			return
		}
		go r.handle(src)
	}
}

func (r *relay) handle(src net.Conn) {
	defer src.Close()
	if !r.track(src) {
		return
	}
	dst, err := net.Dial("tcp", r.target)
	if err != nil {
		return
	}
	defer dst.Close()
	if !r.track(dst) {
		return
	}
	r.mu.Lock()
	mode := r.mode
	r.accepted++
	first := r.accepted == 1
	r.mu.Unlock()

	go func() {
		_, _ = io.Copy(src, dst)
		src.Close()
	}()
	out := &heldWriter{r: r, w: dst}
	switch {
	case mode == relayPass || !first:
		_, _ = io.Copy(out, src)
	case mode == relayMITM:
		r.mitm(src, dst)
	default:
		r.frames(src, out, mode)
	}
}

// heldWriter writes the source's bytes to the destination, holding them after the relay's
// limit.
type heldWriter struct {
	r *relay
	w io.Writer
}

func (h *heldWriter) Write(b []byte) (int, error) {
	h.r.mu.Lock()
	h.r.sent += int64(len(b))
	held := h.r.limit >= 0 && h.r.sent > h.r.limit
	reached, release := h.r.reached, h.r.release
	h.r.mu.Unlock()
	if held {
		select {
		case <-reached:
		default:
			close(reached)
		}
		<-release
	}
	return h.w.Write(b)
}

// readHello reads a whole hello: its fixed part, the migration id, and the KEM ciphertext to
// the destination's key with its length.
func readHello(src io.Reader) ([]byte, error) {
	hello := make([]byte, hsPrefix+hsHelloFixed)
	if _, err := io.ReadFull(src, hello); err != nil {
		return nil, err
	}
	rest := make([]byte, int(hello[len(hello)-1])+2)
	if _, err := io.ReadFull(src, rest); err != nil {
		return nil, err
	}
	enc := make([]byte, binary.BigEndian.Uint16(rest[len(rest)-2:]))
	if _, err := io.ReadFull(src, enc); err != nil {
		return nil, err
	}
	return slices.Concat(hello, rest, enc), nil
}

// mitm answers the source's hello with its own handshake toward the destination.
func (r *relay) mitm(src, dst net.Conn) {
	hello, err := readHello(src)
	if err != nil {
		return
	}
	rand.Read(hello[hsNonceAt : hsNonceAt+32]) // our own nonce: a transcript of our own
	r.mu.Lock()
	r.mutated = true
	r.mu.Unlock()
	// The destination's reply flows back to the source unchanged (the copy above); whatever
	// the source sends next goes to the destination.
	if _, err := dst.Write(hello); err != nil {
		return
	}
	_, _ = io.Copy(dst, src)
}

// frames forwards the first stream frame by frame and mutates its mutateAt-th pages frame.
func (r *relay) frames(src net.Conn, out io.Writer, mode relayMode) {
	fwd := func(n int) ([]byte, error) {
		b := make([]byte, n)
		if _, err := io.ReadFull(src, b); err != nil {
			return nil, err
		}
		return b, nil
	}
	// Handshake: hello, then (after the destination's reply) confirm.
	hello, err := readHello(src)
	if err != nil {
		return
	}
	if _, err := out.Write(hello); err != nil {
		return
	}
	confirm, err := fwd(hsConfirm)
	if err != nil {
		return
	}
	if _, err := out.Write(confirm); err != nil {
		return
	}
	pages := 0
	var held []byte
	for {
		h, err := fwd(frameHeader)
		if err != nil {
			return
		}
		n := binary.BigEndian.Uint32(h[28:32])
		body, err := fwd(int(n))
		if err != nil {
			return
		}
		frame := append(h, body...)
		if h[1] == framePagesT {
			pages++
		}
		if h[1] != framePagesT || (pages != mutateAt && pages != mutateAt+1) {
			if _, err := out.Write(frame); err != nil {
				return
			}
			continue
		}
		switch {
		case mode == relayTamper && pages == mutateAt:
			frame[frameHeader+len(body)/2] ^= 0x01
			r.markMutated()
		case mode == relayReplay && pages == mutateAt:
			if _, err := out.Write(frame); err != nil {
				return
			}
			r.markMutated()
		case mode == relayTruncate && pages == mutateAt:
			_, _ = out.Write(frame[:len(frame)/2])
			r.markMutated()
			r.closeAll()
			return
		case mode == relayReorder && pages == mutateAt:
			held = frame
			continue
		case mode == relayReorder && pages == mutateAt+1:
			if _, err := out.Write(frame); err != nil {
				return
			}
			frame = held
			r.markMutated()
		}
		if _, err := out.Write(frame); err != nil {
			return
		}
	}
}

func (r *relay) markMutated() {
	r.mu.Lock()
	r.mutated = true
	r.mu.Unlock()
}

// closeAll closes the relay's connections (without refusing new ones).
func (r *relay) closeAll() {
	r.mu.Lock()
	conns := r.conns
	r.conns = nil
	r.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}
