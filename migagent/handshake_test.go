package migagent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"testing/synctest"
	"time"
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

func confirmKey(t *testing.T, seed byte, id string) []byte {
	t.Helper()
	k, err := macKey(testKey(t, seed), id, confirmInfo)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var testParams = handshakeParams{migrationID: "mig", streams: 2, flags: flagMemory, pages: 256}

// handshakePair runs both sides of key confirmation over a pipe, through relay if not nil.
func handshakePair(t *testing.T, srcKey, dstKey []byte, relay func(src, dst net.Conn)) (srcSent, dstSent []byte, srcErr, dstErr error) {
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
			_, _, err = serverHello(dstConn, want, dstKey)
		}
		dstErr = err
	})
	_, srcErr = clientHandshake(srcConn, testParams, srcKey)
	srcConn.Close()
	wg.Wait()
	return srcConn.sent(), dstConn.sent(), srcErr, dstErr
}

func TestKeyConfirmation(t *testing.T) {
	right := confirmKey(t, 1, "mig")
	wrong := confirmKey(t, 2, "mig")
	helloLen := len(testParams.hello(make([]byte, nonceSize)))
	tests := map[string]struct {
		srcKey, dstKey []byte
		relay          func(src, dst net.Conn)
		wantSrc        error
		wantDst        error
		wantSrcSent    int
		wantDstSent    int
	}{
		"ok":                {srcKey: right, dstKey: right, wantSrcSent: helloLen + confirmSize, wantDstSent: replySize},
		"destination-no-tk": {srcKey: right, dstKey: wrong, wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replySize},
		"source-no-tk":      {srcKey: wrong, dstKey: right, wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation, wantSrcSent: helloLen, wantDstSent: replySize},
		"relay-rewrites-nonce": {
			srcKey: right, dstKey: right, wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation,
			wantSrcSent: helloLen, wantDstSent: replySize,
			relay: rewriteRelay(func(hello []byte) { hello[30] ^= 1 }),
		},
		"relay-rewrites-streams": {
			srcKey: right, dstKey: right, wantSrc: ErrKeyConfirmation, wantDst: ErrKeyConfirmation,
			wantSrcSent: helloLen, wantDstSent: replySize,
			relay: rewriteRelay(func(hello []byte) { hello[prefixSize] = 3 }),
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			srcSent, dstSent, srcErr, dstErr := handshakePair(t, tc.srcKey, tc.dstKey, tc.relay)
			if !errors.Is(srcErr, tc.wantSrc) || (srcErr == nil) != (tc.wantSrc == nil) {
				t.Errorf("source: got %v, want %v", srcErr, tc.wantSrc)
			}
			if !errors.Is(dstErr, tc.wantDst) || (dstErr == nil) != (tc.wantDst == nil) {
				t.Errorf("destination: got %v, want %v", dstErr, tc.wantDst)
			}
			if len(srcSent) != tc.wantSrcSent || len(dstSent) != tc.wantDstSent {
				t.Errorf("sent source %d, destination %d bytes; want %d and %d (nothing after a failed confirmation)",
					len(srcSent), len(dstSent), tc.wantSrcSent, tc.wantDstSent)
			}
		})
	}
}

// rewriteRelay forwards the handshake between src and dst, rewriting the hello on the way.
func rewriteRelay(rewrite func(hello []byte)) func(src, dst net.Conn) {
	return func(src, dst net.Conn) {
		defer dst.Close()
		defer src.Close()
		hello := make([]byte, prefixSize+helloFixed+len(testParams.migrationID))
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
	key := confirmKey(t, 1, "mig")
	_, recorded, _, _ := handshakePair(t, key, key, nil)
	a, b := net.Pipe()
	go func() {
		defer b.Close()
		io.ReadFull(b, make([]byte, prefixSize+helloFixed+len(testParams.migrationID)))
		b.Write(recorded)
		io.Copy(io.Discard, b)
	}()
	src := &recordConn{Conn: a}
	_, err := clientHandshake(src, testParams, key)
	if !errors.Is(err, ErrKeyConfirmation) {
		t.Fatalf("got %v, want ErrKeyConfirmation", err)
	}
	if got := len(src.sent()); got != prefixSize+helloFixed+len(testParams.migrationID) {
		t.Errorf("source sent %d bytes after a failed confirmation", got)
	}
}

func TestJoinNeedsTranscriptAndKey(t *testing.T) {
	key := confirmKey(t, 1, "mig")
	transcript := bytes.Repeat([]byte{1}, 32)
	tests := map[string]struct {
		key        []byte
		transcript []byte
		index      int
		wantErr    error
	}{
		"ok":                 {key: key, transcript: transcript, index: 1},
		"wrong-key":          {key: confirmKey(t, 2, "mig"), transcript: transcript, index: 1, wantErr: ErrKeyConfirmation},
		"other-session":      {key: key, transcript: bytes.Repeat([]byte{2}, 32), index: 1, wantErr: ErrKeyConfirmation},
		"index-out-of-range": {key: key, transcript: transcript, index: 2, wantErr: ErrKeyConfirmation},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			a, b := net.Pipe()
			go func() { join(a, tc.transcript, tc.index, tc.key); a.Close() }()
			if _, err := readPrefix(b); err != nil {
				t.Fatal(err)
			}
			got, err := serverJoin(b, transcript, 2, key)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if err == nil && got != tc.index {
				t.Errorf("index %d, want %d", got, tc.index)
			}
		})
	}
}

func TestHandshakeTimesOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A destination that accepts and never answers.
		a, b := net.Pipe()
		defer b.Close()
		go io.Copy(io.Discard, b)
		stop := withDeadline(t.Context(), a, 5*time.Second)
		defer stop()
		start := time.Now()
		_, err := clientHandshake(a, testParams, confirmKey(t, 1, "mig"))
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
