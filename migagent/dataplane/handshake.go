package dataplane

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

	"github.com/lethe-cc/lethe/keybroker/seal"
)

// Handshake messages, sent in the clear before any key is used. Layouts (big endian):
//
//	hello   (source → destination): magic, 1, streams u8, flags u16, page size u32, pages u64,
//	        nonce [32], id length u8, migration id, enc length u16, enc_d
//	reply   (destination → source): magic, 2, nonce [32], enc length u16, enc_s, MAC_d [32]
//	confirm (source → destination): magic, 3, MAC_s [32]
//	join    (source → destination, streams 1…N-1): magic, 4, index u8, MAC_j [32]
//
// enc_d and enc_s are proofs of possession: KEM ciphertexts (seal.Encapsulate, enc length
// always seal.EncapsulatedSize, 1120 bytes) to the peer's HPKE public key as this end's
// Keys.PeerKey (the keybroker's grant) names it, with the contexts
//
//	ctx_d = "lethe/v1/possession/destination" ‖ migration id   (enc_d, to the destination's key)
//	ctx_s = "lethe/v1/possession/source" ‖ migration id        (enc_s, to the source's key)
//
// Their secrets ss_d and ss_s are recovered only with the private keys the two ends'
// evidence binds. With T = SHA-256("lethe/v1/handshake" ‖ hello ‖ reply without its MAC)
// and K = HKDF-SHA256(TK ‖ ss_d ‖ ss_s, salt = T, info = "lethe/v1/confirm"):
// MAC_d = HMAC(K, "destination" ‖ T), MAC_s = HMAC(K, "source" ‖ T),
// MAC_j = HMAC(K, "join" ‖ T ‖ index). A MAC verifies only if its sender holds TK and the
// HPKE private key the receiver's grant names for it, and saw the same hello and reply. The
// stream keys derive from the same secret and salt (newSessionSecret, streamAEAD).
var handshakeMagic = [8]byte{'L', 'E', 'T', 'H', 'E', '/', 'v', '1'}

const (
	msgHello   = 1
	msgReply   = 2
	msgConfirm = 3
	msgJoin    = 4

	nonceSize    = 32
	prefixSize   = len(handshakeMagic) + 1
	helloFixed   = 1 + 2 + 4 + 8 + nonceSize + 1       // after the prefix, up to the id length
	encLenSize   = 2                                   // the size of an enc length
	replyHead    = prefixSize + nonceSize + encLenSize // a reply up to enc_s
	confirmSize  = prefixSize + sha256.Size
	joinSize     = prefixSize + 1 + sha256.Size
	maxStreams   = 64
	maxIDLen     = 255
	handshakeTag = "lethe/v1/handshake"
)

// Contexts of the proofs of possession; the migration id follows.
const (
	possessionDestination = "lethe/v1/possession/destination"
	possessionSource      = "lethe/v1/possession/source"
)

// Hello flags.
const (
	flagMemory    = 1 << 0
	flagStream    = 1 << 1
	flagZeroPages = 1 << 2
	// flagLanes: every stream after the first carries a byte stream of its own (a lane),
	// beside the one on stream 0.
	flagLanes = 1 << 3
)

// handshakeParams is what the source proposes and the destination checks.
type handshakeParams struct {
	migrationID string
	streams     int
	flags       uint16
	pages       uint64
}

// newHandshakeParams are what one side proposes: a memory transfer of region (with zero pages
// as flags when zeroPages), a byte stream, with lanes a byte stream on every stream, or
// these together.
func newHandshakeParams(migrationID string, streams int, region *Region, zeroPages bool, stream io.ReadWriteCloser, lanes bool) handshakeParams {
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
		if lanes {
			p.flags |= flagLanes
		}
	}
	return p
}

func (p handshakeParams) hello(nonce, enc []byte) []byte {
	b := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	b = append(b, msgHello, byte(p.streams))
	b = binary.BigEndian.AppendUint16(b, p.flags)
	b = binary.BigEndian.AppendUint32(b, PageSize)
	b = binary.BigEndian.AppendUint64(b, p.pages)
	b = append(b, nonce...)
	b = append(b, byte(len(p.migrationID)))
	b = append(b, p.migrationID...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(enc)))
	return append(b, enc...)
}

// transcriptHash is T, over the hello and the reply without its MAC.
func transcriptHash(hello, reply []byte) []byte {
	h := sha256.New()
	h.Write([]byte(handshakeTag))
	h.Write(hello)
	h.Write(reply)
	return h.Sum(nil)
}

// checkHandshakeKeys checks the HPKE keys a migration runs with (Keys.Identity and
// Keys.PeerKey): peerKey must be a public key of the suite, and identity a private key that
// was not zeroized, so that it can still prove possession.
func checkHandshakeKeys(identity *seal.PrivateKey, peerKey []byte) error {
	switch {
	case identity == nil:
		return errors.New("no identity key")
	case identity.Zeroized():
		return errors.New("checking the identity key: it was zeroized")
	case len(peerKey) == 0:
		return errors.New("no peer key")
	}
	if err := seal.CheckPublicKey(peerKey); err != nil {
		return fmt.Errorf("checking the peer key: %w", err)
	}
	return nil
}

// confirmed is what key confirmation on a session's first connection establishes.
type confirmed struct {
	params handshakeParams
	// transcript is T.
	transcript []byte
	// secret is HKDF-Extract(salt = T, TK ‖ ss_d ‖ ss_s), which every key of the session
	// expands from (newSessionSecret).
	secret *SecretKey
	// confirmKey is K, under which the other streams join.
	confirmKey []byte
}

// newConfirmed derives the session secret and K of transcript t. It clears ssD and ssS.
func newConfirmed(p handshakeParams, tk *SecretKey, ssD, ssS, t []byte) (*confirmed, error) {
	secret, err := newSessionSecret(tk, ssD, ssS, t)
	if err != nil {
		return nil, err
	}
	k, err := expandKey(secret, confirmInfo)
	if err != nil {
		secret.Destroy()
		return nil, err
	}
	return &confirmed{params: p, transcript: t, secret: secret, confirmKey: k}, nil
}

// destroy zeroizes the session secret and K. It is safe on nil.
func (c *confirmed) destroy() {
	if c == nil {
		return
	}
	c.secret.Destroy()
	clear(c.confirmKey)
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

// clientHandshake runs the source's side of key confirmation on conn. On any failure it has
// sent nothing but its hello. Errors wrap ErrKeyConfirmation or ErrHandshake, or are the
// transport's.
func clientHandshake(conn net.Conn, p handshakeParams, keys Keys) (*confirmed, error) {
	nonce := make([]byte, nonceSize)
	rand.Read(nonce)
	encD, ssD, err := seal.Encapsulate(keys.PeerKey, possessionDestination+p.migrationID)
	if err != nil {
		return nil, fmt.Errorf("proving possession: %w", err)
	}
	defer clear(ssD)
	hello := p.hello(nonce, encD)
	if _, err := conn.Write(hello); err != nil {
		return nil, fmt.Errorf("sending hello: %w", err)
	}
	reply := make([]byte, replyHead, replyHead+seal.EncapsulatedSize+sha256.Size)
	if err := readReply(conn, reply); err != nil {
		return nil, err
	}
	if [8]byte(reply[:8]) != handshakeMagic || reply[8] != msgReply {
		return nil, fmt.Errorf("%w: malformed reply", ErrHandshake)
	}
	if n := int(binary.BigEndian.Uint16(reply[replyHead-encLenSize:])); n != seal.EncapsulatedSize {
		return nil, fmt.Errorf("%w: possession proof of %d bytes, want %d", ErrHandshake, n, seal.EncapsulatedSize)
	}
	reply = reply[:cap(reply)]
	if err := readReply(conn, reply[replyHead:]); err != nil {
		return nil, err
	}
	encS, macD := reply[replyHead:len(reply)-sha256.Size], reply[len(reply)-sha256.Size:]
	ssS, err := keys.Identity.Decapsulate(encS, possessionSource+p.migrationID)
	if err != nil {
		return nil, fmt.Errorf("%w: opening the destination's possession proof: %w", ErrHandshake, err)
	}
	t := transcriptHash(hello, reply[:len(reply)-sha256.Size])
	c, err := newConfirmed(p, keys.TK, ssD, ssS, t)
	if err != nil {
		return nil, err
	}
	if !hmac.Equal(macD, mac(c.confirmKey, []byte("destination"), t)) {
		c.destroy()
		return nil, fmt.Errorf("%w: destination MAC does not verify: the destination did not prove that it holds TK "+
			"and the HPKE key the grant names for it", ErrKeyConfirmation)
	}
	confirm := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	confirm = append(confirm, msgConfirm)
	confirm = append(confirm, mac(c.confirmKey, []byte("source"), t)...)
	if _, err := conn.Write(confirm); err != nil {
		c.destroy()
		return nil, fmt.Errorf("sending confirmation: %w", err)
	}
	return c, nil
}

// readReply reads len(b) bytes of the destination's reply. A destination that closes the
// connection instead refused key confirmation.
func readReply(conn net.Conn, b []byte) error {
	if _, err := io.ReadFull(conn, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: destination closed the connection", ErrKeyConfirmation)
		}
		return fmt.Errorf("reading reply: %w", err)
	}
	return nil
}

// join sends the join message of stream index of session c on conn.
func join(conn net.Conn, c *confirmed, index int) error {
	b := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	b = append(b, msgJoin, byte(index))
	b = append(b, mac(c.confirmKey, []byte("join"), c.transcript, []byte{byte(index)})...)
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
// most its reply. Errors wrap ErrKeyConfirmation or ErrHandshake, or are the transport's.
func serverHello(conn net.Conn, want handshakeParams, keys Keys) (*confirmed, error) {
	fixed := make([]byte, helloFixed)
	if _, err := io.ReadFull(conn, fixed); err != nil {
		return nil, fmt.Errorf("%w: reading hello: %w", ErrHandshake, err)
	}
	rest := make([]byte, int(fixed[helloFixed-1])+encLenSize)
	if _, err := io.ReadFull(conn, rest); err != nil {
		return nil, fmt.Errorf("%w: reading hello: %w", ErrHandshake, err)
	}
	if n := int(binary.BigEndian.Uint16(rest[len(rest)-encLenSize:])); n != seal.EncapsulatedSize {
		return nil, fmt.Errorf("%w: possession proof of %d bytes, want %d", ErrHandshake, n, seal.EncapsulatedSize)
	}
	encD := make([]byte, seal.EncapsulatedSize)
	if _, err := io.ReadFull(conn, encD); err != nil {
		return nil, fmt.Errorf("%w: reading hello: %w", ErrHandshake, err)
	}
	got := handshakeParams{
		migrationID: string(rest[:len(rest)-encLenSize]),
		streams:     int(fixed[0]),
		flags:       binary.BigEndian.Uint16(fixed[1:3]),
		pages:       binary.BigEndian.Uint64(fixed[7:15]),
	}
	pageSize := binary.BigEndian.Uint32(fixed[3:7])
	const matched = flagMemory | flagStream
	switch {
	case got.migrationID != want.migrationID:
		return nil, fmt.Errorf("%w: migration id %q, want %q", ErrHandshake, got.migrationID, want.migrationID)
	case got.streams < 1 || got.streams > want.streams:
		return nil, fmt.Errorf("%w: %d streams, want 1 to %d", ErrHandshake, got.streams, want.streams)
	case pageSize != PageSize:
		return nil, fmt.Errorf("%w: page size %d, want %d", ErrHandshake, pageSize, PageSize)
	case got.flags&matched != want.flags&matched:
		return nil, fmt.Errorf("%w: source offers memory/stream %#x, destination expects %#x", ErrHandshake, got.flags&matched, want.flags&matched)
	case got.flags&^want.flags != 0:
		return nil, fmt.Errorf("%w: flags %#x not allowed (zero-page elision, lanes?)", ErrHandshake, got.flags&^want.flags)
	case got.pages != want.pages:
		return nil, fmt.Errorf("%w: region of %d pages, want %d", ErrHandshake, got.pages, want.pages)
	}
	hello := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	hello = append(hello, msgHello)
	hello = append(append(append(hello, fixed...), rest...), encD...)

	ssD, err := keys.Identity.Decapsulate(encD, possessionDestination+got.migrationID)
	if err != nil {
		return nil, fmt.Errorf("%w: opening the source's possession proof: %w", ErrHandshake, err)
	}
	encS, ssS, err := seal.Encapsulate(keys.PeerKey, possessionSource+got.migrationID)
	if err != nil {
		clear(ssD)
		return nil, fmt.Errorf("proving possession: %w", err)
	}
	reply := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	reply = append(reply, msgReply)
	nonce := make([]byte, nonceSize)
	rand.Read(nonce)
	reply = append(reply, nonce...)
	reply = binary.BigEndian.AppendUint16(reply, uint16(len(encS)))
	reply = append(reply, encS...)
	t := transcriptHash(hello, reply)
	c, err := newConfirmed(got, keys.TK, ssD, ssS, t)
	if err != nil {
		return nil, err
	}
	reply = append(reply, mac(c.confirmKey, []byte("destination"), t)...)
	if _, err := conn.Write(reply); err != nil {
		c.destroy()
		return nil, fmt.Errorf("sending reply: %w", err)
	}
	confirm := make([]byte, confirmSize)
	if _, err := io.ReadFull(conn, confirm); err != nil {
		c.destroy()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: source closed the connection: it did not accept this destination's "+
				"proof of TK and of the HPKE key its grant names", ErrKeyConfirmation)
		}
		return nil, fmt.Errorf("reading confirmation: %w", err)
	}
	if [8]byte(confirm[:8]) != handshakeMagic || confirm[8] != msgConfirm ||
		!hmac.Equal(confirm[prefixSize:], mac(c.confirmKey, []byte("source"), t)) {
		c.destroy()
		return nil, fmt.Errorf("%w: source MAC does not verify: the source did not prove that it holds TK "+
			"and the HPKE key the grant names for it", ErrKeyConfirmation)
	}
	return c, nil
}

// serverJoin reads the rest of a join message to session c and returns the stream index it
// proves.
func serverJoin(conn net.Conn, c *confirmed) (int, error) {
	b := make([]byte, joinSize-prefixSize)
	if _, err := io.ReadFull(conn, b); err != nil {
		return 0, fmt.Errorf("%w: reading join: %w", ErrHandshake, err)
	}
	index := int(b[0])
	if index < 1 || index >= c.params.streams ||
		!hmac.Equal(b[1:], mac(c.confirmKey, []byte("join"), c.transcript, []byte{b[0]})) {
		return 0, fmt.Errorf("%w: join of stream %d does not verify", ErrKeyConfirmation, index)
	}
	return index, nil
}

// lanes is f if the handshake settled on lanes, else nil.
func (c *confirmed) lanes(f func(int) io.ReadWriteCloser) func(int) io.ReadWriteCloser {
	if c.params.flags&flagLanes == 0 {
		return nil
	}
	return f
}
