package migagent

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Handshake messages, sent in the clear before any key is used. Layouts (big endian):
//
//	hello   (source → destination): magic, 1, streams u8, flags u16, page size u32, pages u64,
//	        nonce [32], id length u8, migration id
//	reply   (destination → source): magic, 2, nonce [32], MAC_d [32]
//	confirm (source → destination): magic, 3, MAC_s [32]
//	join    (source → destination, streams 1…N-1): magic, 4, index u8, MAC_j [32]
//
// With T = SHA-256("lethe/v1/handshake" ‖ hello ‖ reply without its MAC) and
// K = HKDF-SHA256(TK, salt = migration id, info = "lethe/v1/confirm"):
// MAC_d = HMAC(K, "destination" ‖ T), MAC_s = HMAC(K, "source" ‖ T),
// MAC_j = HMAC(K, "join" ‖ T ‖ index).
var handshakeMagic = [8]byte{'L', 'E', 'T', 'H', 'E', '/', 'v', '1'}

const (
	msgHello   = 1
	msgReply   = 2
	msgConfirm = 3
	msgJoin    = 4

	nonceSize    = 32
	prefixSize   = len(handshakeMagic) + 1
	helloFixed   = 1 + 2 + 4 + 8 + nonceSize + 1
	replySize    = prefixSize + nonceSize + sha256.Size
	confirmSize  = prefixSize + sha256.Size
	joinSize     = prefixSize + 1 + sha256.Size
	maxStreams   = 64
	maxIDLen     = 255
	handshakeTag = "lethe/v1/handshake"
)

// Hello flags.
const (
	flagMemory    = 1 << 0
	flagStream    = 1 << 1
	flagZeroPages = 1 << 2
)

// handshakeParams is what the source proposes and the destination checks.
type handshakeParams struct {
	migrationID string
	streams     int
	flags       uint16
	pages       uint64
}

// newHandshakeParams are what one side proposes: a memory transfer of region (with zero pages
// as flags when zeroPages), a byte stream, or both.
func newHandshakeParams(migrationID string, streams int, region *Region, zeroPages bool, stream io.ReadWriteCloser) handshakeParams {
	p := handshakeParams{migrationID: migrationID, streams: streams}
	if region != nil {
		p.flags |= flagMemory
		p.pages = uint64(region.Pages())
		if zeroPages {
			p.flags |= flagZeroPages
		}
	}
	if stream != nil {
		p.flags |= flagStream
	}
	return p
}

func (p handshakeParams) hello(nonce []byte) []byte {
	b := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	b = append(b, msgHello, byte(p.streams))
	b = binary.BigEndian.AppendUint16(b, p.flags)
	b = binary.BigEndian.AppendUint32(b, PageSize)
	b = binary.BigEndian.AppendUint64(b, p.pages)
	b = append(b, nonce...)
	b = append(b, byte(len(p.migrationID)))
	return append(b, p.migrationID...)
}

func transcriptHash(hello, reply []byte) []byte {
	h := sha256.New()
	h.Write([]byte(handshakeTag))
	h.Write(hello)
	h.Write(reply[:prefixSize+nonceSize])
	return h.Sum(nil)
}

// withDeadline bounds conn's I/O by ctx and timeout until the returned stop is called.
func withDeadline(ctx context.Context, conn net.Conn, timeout time.Duration) (stop func()) {
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	unhook := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		unhook()
		_ = conn.SetDeadline(time.Time{})
	}
}

// clientHandshake runs the source's side of key confirmation on conn and returns the
// transcript hash. On any failure it has sent nothing but its hello. Errors wrap
// ErrKeyConfirmation or ErrHandshake, or are the transport's.
func clientHandshake(conn net.Conn, p handshakeParams, confirmKey []byte) ([]byte, error) {
	nonce := make([]byte, nonceSize)
	rand.Read(nonce)
	hello := p.hello(nonce)
	if _, err := conn.Write(hello); err != nil {
		return nil, fmt.Errorf("sending hello: %w", err)
	}
	reply := make([]byte, replySize)
	if _, err := io.ReadFull(conn, reply); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: destination closed the connection", ErrKeyConfirmation)
		}
		return nil, fmt.Errorf("reading reply: %w", err)
	}
	if [8]byte(reply[:8]) != handshakeMagic || reply[8] != msgReply {
		return nil, fmt.Errorf("%w: malformed reply", ErrHandshake)
	}
	t := transcriptHash(hello, reply)
	if !hmac.Equal(reply[prefixSize+nonceSize:], mac(confirmKey, []byte("destination"), t)) {
		return nil, fmt.Errorf("%w: destination MAC does not verify", ErrKeyConfirmation)
	}
	confirm := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	confirm = append(confirm, msgConfirm)
	confirm = append(confirm, mac(confirmKey, []byte("source"), t)...)
	if _, err := conn.Write(confirm); err != nil {
		return nil, fmt.Errorf("sending confirmation: %w", err)
	}
	return t, nil
}

// join sends the join message of stream index on conn.
func join(conn net.Conn, transcript []byte, index int, confirmKey []byte) error {
	b := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	b = append(b, msgJoin, byte(index))
	b = append(b, mac(confirmKey, []byte("join"), transcript, []byte{byte(index)})...)
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("joining stream %d: %w", index, err)
	}
	return nil
}

// readPrefix reads the magic and message type of a handshake message.
func readPrefix(conn net.Conn) (byte, error) {
	var p [prefixSize]byte
	if _, err := io.ReadFull(conn, p[:]); err != nil {
		return 0, fmt.Errorf("%w: reading handshake: %w", ErrHandshake, err)
	}
	if [8]byte(p[:8]) != handshakeMagic {
		return 0, fmt.Errorf("%w: bad magic", ErrHandshake)
	}
	return p[8], nil
}

// serverHello runs the destination's side of key confirmation after the prefix of a hello
// was read, checking the proposal against want (streams is the maximum accepted, flags the
// allowed set, with flagMemory and flagStream required to match). On failure it has sent at
// most its reply.
func serverHello(conn net.Conn, want handshakeParams, confirmKey []byte) (handshakeParams, []byte, error) {
	fixed := make([]byte, helloFixed)
	if _, err := io.ReadFull(conn, fixed); err != nil {
		return handshakeParams{}, nil, fmt.Errorf("%w: reading hello: %w", ErrHandshake, err)
	}
	id := make([]byte, fixed[helloFixed-1])
	if _, err := io.ReadFull(conn, id); err != nil {
		return handshakeParams{}, nil, fmt.Errorf("%w: reading hello: %w", ErrHandshake, err)
	}
	got := handshakeParams{
		migrationID: string(id),
		streams:     int(fixed[0]),
		flags:       binary.BigEndian.Uint16(fixed[1:3]),
		pages:       binary.BigEndian.Uint64(fixed[7:15]),
	}
	pageSize := binary.BigEndian.Uint32(fixed[3:7])
	const matched = flagMemory | flagStream
	switch {
	case got.migrationID != want.migrationID:
		return got, nil, fmt.Errorf("%w: migration id %q, want %q", ErrHandshake, got.migrationID, want.migrationID)
	case got.streams < 1 || got.streams > want.streams:
		return got, nil, fmt.Errorf("%w: %d streams, want 1 to %d", ErrHandshake, got.streams, want.streams)
	case pageSize != PageSize:
		return got, nil, fmt.Errorf("%w: page size %d, want %d", ErrHandshake, pageSize, PageSize)
	case got.flags&matched != want.flags&matched:
		return got, nil, fmt.Errorf("%w: source offers memory/stream %#x, destination expects %#x", ErrHandshake, got.flags&matched, want.flags&matched)
	case got.flags&^want.flags != 0:
		return got, nil, fmt.Errorf("%w: flags %#x not allowed (zero-page elision?)", ErrHandshake, got.flags&^want.flags)
	case got.pages != want.pages:
		return got, nil, fmt.Errorf("%w: region of %d pages, want %d", ErrHandshake, got.pages, want.pages)
	}
	hello := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	hello = append(hello, msgHello)
	hello = append(append(hello, fixed...), id...)

	reply := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	reply = append(reply, msgReply)
	nonce := make([]byte, nonceSize)
	rand.Read(nonce)
	reply = append(reply, nonce...)
	t := transcriptHash(hello, reply)
	reply = append(reply, mac(confirmKey, []byte("destination"), t)...)
	if _, err := conn.Write(reply); err != nil {
		return got, nil, fmt.Errorf("sending reply: %w", err)
	}
	confirm := make([]byte, confirmSize)
	if _, err := io.ReadFull(conn, confirm); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return got, nil, fmt.Errorf("%w: source closed the connection", ErrKeyConfirmation)
		}
		return got, nil, fmt.Errorf("reading confirmation: %w", err)
	}
	if [8]byte(confirm[:8]) != handshakeMagic || confirm[8] != msgConfirm ||
		!hmac.Equal(confirm[prefixSize:], mac(confirmKey, []byte("source"), t)) {
		return got, nil, fmt.Errorf("%w: source MAC does not verify", ErrKeyConfirmation)
	}
	return got, t, nil
}

// serverJoin reads the rest of a join message and returns the stream index it proves.
func serverJoin(conn net.Conn, transcript []byte, streams int, confirmKey []byte) (int, error) {
	b := make([]byte, joinSize-prefixSize)
	if _, err := io.ReadFull(conn, b); err != nil {
		return 0, fmt.Errorf("%w: reading join: %w", ErrHandshake, err)
	}
	index := int(b[0])
	if transcript == nil || index < 1 || index >= streams ||
		!hmac.Equal(b[1:], mac(confirmKey, []byte("join"), transcript, []byte{b[0]})) {
		return 0, fmt.Errorf("%w: join of stream %d does not verify", ErrKeyConfirmation, index)
	}
	return index, nil
}
