package dataplane

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
)

// TestMigrateByteStreams carries byte streams both ways: one on stream 0 of two streams (a
// hypervisor's single migration stream), and three lanes, one per stream (its multifd
// channels too). Each arrives whole and in order on its own lane, and each end's half-close
// reaches the other.
func TestMigrateByteStreams(t *testing.T) {
	for name, tc := range map[string]struct{ streams, lanes int }{
		"one byte stream":       {streams: 2, lanes: 1},
		"a lane on each stream": {streams: 3, lanes: 3},
	} {
		t.Run(name, func(t *testing.T) {
			srcHyp, srcEnd := make([]*halfConn, tc.lanes), make([]*halfConn, tc.lanes)
			dstHyp, dstEnd := make([]*halfConn, tc.lanes), make([]*halfConn, tc.lanes)
			for i := range tc.lanes {
				srcHyp[i], srcEnd[i] = duplex()
				dstHyp[i], dstEnd[i] = duplex()
			}
			forward := func(i int) []byte {
				// A counter, so that bytes moved within a lane would show.
				b := make([]byte, (i+3)<<20+17*i)
				for k := range b {
					b[k] = byte(k*7 + k>>9 + i)
				}
				return b
			}
			back := func(i int) []byte { return fmt.Appendf(nil, "lane %d loaded; resumed", i) }

			ln := listen(t)
			srcCfg := SourceConfig{MigrationID: "lanes", Peer: ln.Addr().String(), Streams: tc.streams, Stream: srcEnd[0]}
			dstCfg := DestinationConfig{MigrationID: "lanes", MaxStreams: tc.streams, Stream: dstEnd[0]}
			if tc.lanes > 1 {
				srcCfg.Lanes = func(i int) io.ReadWriteCloser { return srcEnd[i] }
				dstCfg.Lanes = func(i int) io.ReadWriteCloser { return dstEnd[i] }
			}
			src, err := NewSource(srcCfg)
			if err != nil {
				t.Fatal(err)
			}
			dst, err := NewDestination(dstCfg)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			gotForward, gotBack := make([][]byte, tc.lanes), make([][]byte, tc.lanes)
			errs := make([]error, 4*tc.lanes)
			for i := range tc.lanes {
				wg.Go(func() { _, errs[4*i] = srcHyp[i].Write(forward(i)); errs[4*i+1] = srcHyp[i].CloseWrite() })
				wg.Go(func() { gotBack[i], errs[4*i+2] = io.ReadAll(srcHyp[i]) })
				wg.Go(func() {
					gotForward[i], errs[4*i+3] = io.ReadAll(dstHyp[i])
					dstHyp[i].Write(back(i))
					dstHyp[i].CloseWrite()
				})
			}
			ids := newIdentities(t)
			m := &migration{src: src, dst: dst, srcKeys: ids.source(Keys{TK: testKey(t, 1)}), dstKeys: ids.destination(Keys{TK: testKey(t, 1)})}
			m.run(t, ln)
			wg.Wait()
			if m.srcErr != nil || m.dstErr != nil {
				t.Fatalf("source: %v; destination: %v", m.srcErr, m.dstErr)
			}
			if err := errors.Join(errs...); err != nil {
				t.Fatal(err)
			}
			for i := range tc.lanes {
				if !bytes.Equal(gotForward[i], forward(i)) {
					t.Errorf("lane %d forward: got %d bytes, want %d (or bytes out of place)", i, len(gotForward[i]), len(forward(i)))
				}
				if !bytes.Equal(gotBack[i], back(i)) {
					t.Errorf("lane %d back: got %q, want %q", i, gotBack[i], back(i))
				}
			}
		})
	}
}

// TestLanesNeedTheDestinationsConsent: a destination that gives no lanes refuses a source
// that would send a byte stream on every stream, instead of dropping what those carry.
func TestLanesNeedTheDestinationsConsent(t *testing.T) {
	_, srcEnd := duplex()
	_, dstEnd := duplex()
	ln := listen(t)
	src, err := NewSource(SourceConfig{
		MigrationID: "lanes", Peer: ln.Addr().String(), Streams: 2,
		Stream: srcEnd, Lanes: func(int) io.ReadWriteCloser { _, e := duplex(); return e },
	})
	if err != nil {
		t.Fatal(err)
	}
	logger, rejected := rejections()
	dst, err := NewDestination(DestinationConfig{MigrationID: "lanes", Stream: dstEnd, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	ids := newIdentities(t)
	done := make(chan error, 1)
	go func() {
		_, err := dst.Receive(t.Context(), ln, ids.destination(Keys{TK: testKey(t, 1)}))
		done <- err
	}()
	if _, err := src.Run(t.Context(), ids.source(Keys{TK: testKey(t, 1)})); !errors.Is(err, ErrKeyConfirmation) {
		t.Errorf("source: got %v, want ErrKeyConfirmation (destination closed)", err)
	}
	if r := <-rejected; !bytes.Contains([]byte(r), []byte("not allowed")) {
		t.Errorf("destination logged %q, want the flags refused", r)
	}
	ln.Close()
	if err := <-done; !errors.Is(err, ErrHandshake) {
		t.Errorf("destination: got %v, want ErrHandshake", err)
	}
}

// TestLaneFramesAfterCloseWrite: a peer that half-closes a lane and then sends on it, or
// closes it again, fails the session with a malformed frame.
func TestLaneFramesAfterCloseWrite(t *testing.T) {
	for _, then := range []frameType{frameData, frameCloseWrite} {
		t.Run(then.String(), func(t *testing.T) {
			a, b := net.Pipe()
			_, srcEnd := duplex()
			dstHyp, dstEnd := duplex()
			go io.Copy(io.Discard, dstHyp)
			cfg := sessionConfig{secret: testKey(t, 9), transcript: []byte("t"), conns: []net.Conn{a}, local: srcEnd, log: slog.New(slog.DiscardHandler)}
			cfg.role = roleSource
			src, err := newSession(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer src.close()
			cfg.role, cfg.conns, cfg.local, cfg.secret = roleDestination, []net.Conn{b}, dstEnd, testKey(t, 9)
			dst, err := newSession(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer dst.close()
			send := func(job sendJob) {
				job.done = make(chan struct{})
				if err := src.submit(0, job); err != nil {
					t.Fatal(err)
				}
				<-job.done
			}
			send(sendJob{typ: frameData, data: []byte("before")})
			send(sendJob{typ: frameCloseWrite})
			send(sendJob{typ: then, data: []byte("after")})
			<-dst.ctx.Done()
			if err := dst.err(); !errors.Is(err, ErrMalformedFrame) {
				t.Errorf("destination: got %v, want ErrMalformedFrame", err)
			}
		})
	}
}

// TestDataOnAStreamWithoutByteStream: without lanes only stream 0 carries a byte stream; a
// peer that sends data on another stream fails the session with a malformed frame.
func TestDataOnAStreamWithoutByteStream(t *testing.T) {
	a0, b0 := net.Pipe()
	a1, b1 := net.Pipe()
	_, srcEnd := duplex()
	_, dstEnd := duplex()
	cfg := sessionConfig{role: roleSource, secret: testKey(t, 9), transcript: []byte("t"), conns: []net.Conn{a0, a1}, local: srcEnd, log: slog.New(slog.DiscardHandler)}
	src, err := newSession(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.close()
	cfg.role, cfg.conns, cfg.local, cfg.secret = roleDestination, []net.Conn{b0, b1}, dstEnd, testKey(t, 9)
	dst, err := newSession(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.close()
	if err := src.submit(1, sendJob{typ: frameData, data: []byte("smuggled"), done: make(chan struct{})}); err != nil {
		t.Fatal(err)
	}
	<-dst.ctx.Done()
	if err := dst.err(); !errors.Is(err, ErrMalformedFrame) {
		t.Errorf("destination: got %v, want ErrMalformedFrame", err)
	}
}
