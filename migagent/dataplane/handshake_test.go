package dataplane

import (
	"bytes"
	"context"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/keybroker/seal"
)

// recordConn records what is written through it.
type recordConn struct {
	net.Conn
	mu      sync.Mutex
	written bytes.Buffer
}

func (c *recordConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.written.Write(b)
	c.mu.Unlock()
	return c.Conn.Write(b)
}

func (c *recordConn) sent() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.written.Bytes())
}

var testParams = handshakeParams{migrationID: "mig", streams: 2, flags: flagMemory, pages: 256}

// Sizes of testParams' hello and of a reply.
var (
	helloLen = len(testParams.hello(make([]byte, nonceSize), make([]byte, seal.EncapsulatedSize)))
	replyLen = replyHead + seal.EncapsulatedSize + sha256.Size
	// encAt is where enc_d's length starts in testParams' hello.
	encAt = prefixSize + helloFixed + len(testParams.migrationID)
)

// handshakeEnds gives each end of a handshake its TK (by seed) and the HPKE keys of ids.
func handshakeEnds(t *testing.T, ids identities, srcSeed, dstSeed byte) (src, dst Keys) {
	t.Helper()
	return ids.source(Keys{TK: testKey(t, srcSeed)}), ids.destination(Keys{TK: testKey(t, dstSeed)})
}

// handshakeResult is what both ends of one handshake did.
type handshakeResult struct {
	srcSent, dstSent []byte
	src, dst         *confirmed
	srcErr, dstErr   error
}

// handshakePair runs both sides of key confirmation over a pipe, through relay if not nil.
func handshakePair(t *testing.T, src, dst Keys, relay func(src, dst net.Conn)) handshakeResult {
	t.Helper()
	a, b := net.Pipe()
	srcConn := &recordConn{Conn: a}
	var dstRaw net.Conn = b
	if relay != nil {
		c, d := net.Pipe()
		go relay(b, c)
		dstRaw = d
	}
	dstConn := &recordConn{Conn: dstRaw}
	var res handshakeResult
	var wg sync.WaitGroup
	wg.Go(func() {
		defer dstConn.Close()
		typ, err := readPrefix(dstConn)
		if err == nil && typ != msgHello {
			err = ErrHandshake
		}
		if err == nil {
			want := testParams
			want.streams = 4
			want.flags |= flagZeroPages
			res.dst, err = serverHello(dstConn, want, dst)
		}
		res.dstErr = err
	})
	res.src, res.srcErr = clientHandshake(srcConn, testParams, src)
	srcConn.Close()
	wg.Wait()
	t.Cleanup(func() { res.src.destroy(); res.dst.destroy() })
	res.srcSent, res.dstSent = srcConn.sent(), dstConn.sent()
	return res
}

func TestKeyConfirmation(t *testing.T) {
	ids := newIdentities(t)
	impostor := testIdentity(t)
	tests := map[string]struct {
		// change makes one end lack what it must prove.
		change      func(src, dst *Keys)
		relay       func(src, dst net.Conn)
		wantSrc     error
		wantDst     error
		wantSrcSent int
		wantDstSent int
	}{
		"ok": {wantSrcSent: helloLen + confirmSize, wantDstSent: replyLen},
		"destination-no-tk": {
			change:  func(_, dst *Keys) { dst.TK = testKey(t, 2) },
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
		},
		"source-no-tk": {
			change:  func(src, _ *Keys) { src.TK = testKey(t, 2) },
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
		},
		// An agent that holds TK (say, from a repeated release) but not the HPKE key the
		// source's grant names for the destination.
		"destination-not-the-granted-key": {
			change:  func(_, dst *Keys) { dst.Identity = impostor },
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
		},
		"source-not-the-granted-key": {
			change:  func(src, _ *Keys) { src.Identity = impostor },
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
		},
		// The destination's grant names another source than the one that connects.
		"destination-expects-another-source": {
			change:  func(_, dst *Keys) { dst.PeerKey = impostor.PublicKey() },
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
		},
		"relay-rewrites-nonce": {
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
			relay: rewriteRelay(func(hello []byte) { hello[30] ^= 1 }),
		},
		"relay-rewrites-streams": {
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
			relay: rewriteRelay(func(hello []byte) { hello[prefixSize] = 3 }),
		},
		"relay-rewrites-proof": {
			wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replyLen,
			relay: rewriteRelay(func(hello []byte) { hello[encAt+encLenSize+100] ^= 1 }),
		},
		"relay-rewrites-proof-length": {
			wantSrc: ErrKeyConfirmation, wantDst: ErrHandshake, wantSrcSent: helloLen, wantDstSent: 0,
			relay: rewriteRelay(func(hello []byte) { hello[encAt+1]-- }),
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			src, dst := handshakeEnds(t, ids, 1, 1)
			if tc.change != nil {
				tc.change(&src, &dst)
			}
			r := handshakePair(t, src, dst, tc.relay)
			if !errors.Is(r.srcErr, tc.wantSrc) || (r.srcErr == nil) != (tc.wantSrc == nil) {
				t.Errorf("source: got %v, want %v", r.srcErr, tc.wantSrc)
			}
			if !errors.Is(r.dstErr, tc.wantDst) || (r.dstErr == nil) != (tc.wantDst == nil) {
				t.Errorf("destination: got %v, want %v", r.dstErr, tc.wantDst)
			}
			if len(r.srcSent) != tc.wantSrcSent || len(r.dstSent) != tc.wantDstSent {
				t.Errorf("sent source %d, destination %d bytes; want %d and %d (nothing after a failed confirmation)",
					len(r.srcSent), len(r.dstSent), tc.wantSrcSent, tc.wantDstSent)
			}
			if (r.src == nil) != (r.srcErr != nil) || (r.dst == nil) != (r.dstErr != nil) {
				t.Errorf("sessions: source %v, destination %v; want one exactly when confirmation succeeded", r.src, r.dst)
			}
		})
	}
}

// rewriteRelay forwards the handshake between src and dst, rewriting the hello on the way.
func rewriteRelay(rewrite func(hello []byte)) func(src, dst net.Conn) {
	return func(src, dst net.Conn) {
		defer dst.Close()
		defer src.Close()
		hello := make([]byte, helloLen)
		if _, err := io.ReadFull(src, hello); err != nil {
			return
		}
		rewrite(hello)
		dst.Write(hello)
		go func() { io.Copy(dst, src); dst.Close() }()
		io.Copy(src, dst)
	}
}

func TestReplayedReplyFails(t *testing.T) {
	// A relay records a destination's reply in one session and replays it in another.
	src, dst := handshakeEnds(t, newIdentities(t), 1, 1)
	recorded := handshakePair(t, src, dst, nil).dstSent
	a, b := net.Pipe()
	go func() {
		defer b.Close()
		io.ReadFull(b, make([]byte, helloLen))
		b.Write(recorded)
		io.Copy(io.Discard, b)
	}()
	conn := &recordConn{Conn: a}
	_, err := clientHandshake(conn, testParams, src)
	if !errors.Is(err, ErrKeyConfirmation) {
		t.Fatalf("got %v, want ErrKeyConfirmation", err)
	}
	if got := len(conn.sent()); got != helloLen {
		t.Errorf("source sent %d bytes after a failed confirmation", got)
	}
}

func TestJoinNeedsTranscriptAndKey(t *testing.T) {
	session := &confirmed{params: handshakeParams{streams: 2}, transcript: bytes.Repeat([]byte{1}, 32), confirmKey: bytes.Repeat([]byte{5}, 32)}
	tests := map[string]struct {
		joiner  *confirmed
		index   int
		wantErr error
	}{
		"ok":                 {joiner: session, index: 1},
		"wrong-key":          {joiner: &confirmed{transcript: session.transcript, confirmKey: bytes.Repeat([]byte{6}, 32)}, index: 1, wantErr: ErrKeyConfirmation},
		"other-session":      {joiner: &confirmed{transcript: bytes.Repeat([]byte{2}, 32), confirmKey: session.confirmKey}, index: 1, wantErr: ErrKeyConfirmation},
		"index-out-of-range": {joiner: session, index: 2, wantErr: ErrKeyConfirmation},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			a, b := net.Pipe()
			go func() { join(a, tc.joiner, tc.index); a.Close() }()
			if _, err := readPrefix(b); err != nil {
				t.Fatal(err)
			}
			got, err := serverJoin(b, session)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if err == nil && got != tc.index {
				t.Errorf("index %d, want %d", got, tc.index)
			}
		})
	}
}

func TestSessionSecretIsHKDFOfTKAndBothKEMSecrets(t *testing.T) {
	ssD, ssS, transcript := bytes.Repeat([]byte{2}, 32), bytes.Repeat([]byte{3}, 32), bytes.Repeat([]byte{4}, 32)
	ikm := append(append(testKeyBytes(1), ssD...), ssS...)
	secret, err := newSessionSecret(testKey(t, 1), bytes.Clone(ssD), bytes.Clone(ssS), transcript)
	if err != nil {
		t.Fatal(err)
	}
	defer secret.Destroy()
	for _, info := range []string{confirmInfo, streamInfoFor(sourceToDestination, 0), streamInfoFor(destinationToSource, 3)} {
		got, err := expandKey(secret, info)
		if err != nil {
			t.Fatal(err)
		}
		want, err := hkdf.Key(sha256.New, ikm, transcript, info, 32)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("%q key, not HKDF-SHA256(TK ‖ ss_d ‖ ss_s, salt = T, info) (-want +got):\n%s", info, diff)
		}
	}
	if want := streamInfo + "s\x00\x00\x00\x00"; streamInfoFor(sourceToDestination, 0) != want {
		t.Errorf("stream info %q, want %q", streamInfoFor(sourceToDestination, 0), want)
	}
}

func TestNewSessionSecretClearsKEMSecrets(t *testing.T) {
	ssD, ssS := bytes.Repeat([]byte{2}, 32), bytes.Repeat([]byte{3}, 32)
	secret, err := newSessionSecret(testKey(t, 1), ssD, ssS, make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	secret.Destroy()
	if zero := make([]byte, 32); !bytes.Equal(ssD, zero) || !bytes.Equal(ssS, zero) {
		t.Error("ss_d or ss_s not cleared")
	}
}

// TestSessionsUnderOneTKHaveOwnStreamKeys: the keybroker may seal one TK again in a repeated
// release; a second session under it must not reuse the first one's stream keys, whose GCM
// nonces are sequence numbers starting at 0. Both sessions run with the same TK and the same
// HPKE keys at both ends, and the frames compared carry the same header (the AEAD's only
// associated data) and sequence number: only the stream key differs.
func TestSessionsUnderOneTKHaveOwnStreamKeys(t *testing.T) {
	src, dst := handshakeEnds(t, newIdentities(t), 1, 1)
	one := handshakePair(t, src, dst, nil)
	two := handshakePair(t, src, dst, nil)
	if err := errors.Join(one.srcErr, one.dstErr, two.srcErr, two.dstErr); err != nil {
		t.Fatal(err)
	}
	key := func(c *confirmed, dir direction, index uint32) []byte {
		t.Helper()
		k, err := expandKey(c.secret, streamInfoFor(dir, index))
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	for _, dir := range []direction{sourceToDestination, destinationToSource} {
		for index := range uint32(testParams.streams) {
			k1, k2 := key(one.src, dir, index), key(two.src, dir, index)
			switch {
			case !bytes.Equal(k1, key(one.dst, dir, index)) || !bytes.Equal(k2, key(two.dst, dir, index)):
				t.Fatalf("stream %c%d: the two ends of one session derived different keys", dir, index)
			case bytes.Equal(k1, k2):
				t.Errorf("stream %c%d: two sessions under one TK derived the same key", dir, index)
			}
		}
	}

	// One page frame, sealed under session one's key, opened with either session's key; the
	// reader's transcript (which only feeds the FIN's hash, not the AEAD) is session one's in
	// both cases.
	aead := func(c *confirmed) cipher.AEAD {
		t.Helper()
		a, err := streamAEAD(c.secret, sourceToDestination, 0)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	page := bytes.Repeat([]byte{9}, PageSize)
	frame := newFrameWriter(aead(one.src), 0, one.src.transcript).seal(nil, framePages, 0, 1, page)
	tests := map[string]struct {
		opener  *confirmed
		wantErr error
	}{
		"same-session":  {opener: one.dst},
		"other-session": {opener: two.dst, wantErr: ErrFrameAuthentication},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := newFrameReader(bytes.NewReader(frame), aead(tc.opener), 0, one.src.transcript)
			h, f, err := r.read(nil)
			if err != nil {
				t.Fatal(err)
			}
			pt, err := r.open(nil, h, f)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if err == nil && !bytes.Equal(pt, page) {
				t.Error("the frame opened to another page")
			}
		})
	}
}

func TestHandshakeTimesOut(t *testing.T) {
	src, _ := handshakeEnds(t, newIdentities(t), 1, 1)
	synctest.Test(t, func(t *testing.T) {
		// A destination that accepts and never answers.
		a, b := net.Pipe()
		defer b.Close()
		go io.Copy(io.Discard, b)
		stop := withDeadline(t.Context(), a, 5*time.Second)
		defer stop()
		start := time.Now()
		_, err := clientHandshake(a, testParams, src)
		if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, errTimeout(err)) {
			t.Fatalf("got %v, want a timeout", err)
		}
		if d := time.Since(start); d != 5*time.Second {
			t.Errorf("timed out after %v, want 5s", d)
		}
	})
}

func errTimeout(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return err
	}
	return errors.New("not a timeout")
}

// scriptConn plays in to whoever reads from it and records what is written.
type scriptConn struct {
	net.Conn
	in      io.Reader
	written bytes.Buffer
}

func (c *scriptConn) Read(b []byte) (int, error)  { return c.in.Read(b) }
func (c *scriptConn) Write(b []byte) (int, error) { return c.written.Write(b) }

func FuzzServerHello(f *testing.F) {
	ids := newIdentities(f)
	enc, ss, err := seal.Encapsulate(ids.dst.PublicKey(), possessionDestination+testParams.migrationID)
	if err != nil {
		f.Fatal(err)
	}
	clear(ss)
	hello := testParams.hello(make([]byte, nonceSize), enc)
	f.Add(hello)
	f.Add(hello[:encAt])
	f.Add(hello[:encAt+encLenSize+10])
	short := bytes.Clone(hello[:encAt])
	f.Add(binary.BigEndian.AppendUint16(short, 0xffff))
	f.Add(append(bytes.Clone(hello), make([]byte, confirmSize)...))
	tk := testKey(f, 1)
	dst := ids.destination(Keys{TK: tk})
	want := testParams
	want.flags |= flagZeroPages
	f.Fuzz(func(t *testing.T, in []byte) {
		conn := &scriptConn{in: bytes.NewReader(in)}
		typ, err := readPrefix(conn)
		if err == nil && typ == msgHello {
			var c *confirmed
			c, err = serverHello(conn, want, dst)
			c.destroy()
		}
		switch {
		case err == nil && typ == msgHello:
			t.Fatal("key confirmation succeeded without the source's MAC")
		case err != nil && !errors.Is(err, ErrHandshake) && !errors.Is(err, ErrKeyConfirmation):
			t.Fatalf("unnamed error: %v", err)
		case conn.written.Len() != 0 && conn.written.Len() != replyLen:
			t.Fatalf("destination sent %d bytes, want none or a reply", conn.written.Len())
		}
	})
}

func FuzzClientReply(f *testing.F) {
	ids := newIdentities(f)
	src := ids.source(Keys{TK: testKey(f, 1)})
	enc, ss, err := seal.Encapsulate(ids.src.PublicKey(), possessionSource+testParams.migrationID)
	if err != nil {
		f.Fatal(err)
	}
	clear(ss)
	reply := append(handshakeMagic[:0:0], handshakeMagic[:]...)
	reply = append(reply, msgReply)
	reply = append(reply, make([]byte, nonceSize)...)
	reply = binary.BigEndian.AppendUint16(reply, uint16(len(enc)))
	reply = append(reply, enc...)
	reply = append(reply, make([]byte, sha256.Size)...)
	f.Add(reply)
	f.Add(reply[:replyHead])
	f.Add(reply[:replyHead+10])
	f.Add(binary.BigEndian.AppendUint16(bytes.Clone(reply[:replyHead-encLenSize]), 3))
	f.Fuzz(func(t *testing.T, in []byte) {
		conn := &scriptConn{in: bytes.NewReader(in)}
		c, err := clientHandshake(conn, testParams, src)
		c.destroy()
		switch {
		case err == nil:
			t.Fatal("key confirmation succeeded without the destination's MAC")
		case !errors.Is(err, ErrHandshake) && !errors.Is(err, ErrKeyConfirmation):
			t.Fatalf("unnamed error: %v", err)
		case conn.written.Len() != helloLen:
			t.Fatalf("source sent %d bytes, want its hello only", conn.written.Len())
		}
	})
}
