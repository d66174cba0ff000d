package dataplane

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// benchSize is what one iteration of BenchmarkTransfer moves.
const benchSize = 64 << 20

func BenchmarkTransfer(b *testing.B) {
	src := testRegion(b, benchSize)
	fillRegion(src, 1)
	b.Run("plaintext", func(b *testing.B) {
		c, s := tcpPair(b)
		benchCopy(b, c, s, src)
	})
	b.Run("tls13", func(b *testing.B) {
		c, s := tcpPair(b)
		cert := selfSigned(b)
		pool := x509.NewCertPool()
		pool.AddCert(cert.Leaf)
		server := tls.Server(s, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
		client := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "lethe", MinVersion: tls.VersionTLS13})
		errc := make(chan error, 1)
		go func() { errc <- server.Handshake() }()
		if err := client.Handshake(); err != nil {
			b.Fatal(err)
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
		b.Logf("TLS cipher suite: %s", tls.CipherSuiteName(client.ConnectionState().CipherSuite))
		benchCopy(b, client, server, src)
	})
	for _, n := range []int{1, 2, 4} {
		name := fmt.Sprintf("lethe-%dstream", n)
		if n > 1 {
			name += "s"
		}
		b.Run(name, func(b *testing.B) { benchLethe(b, src, n) })
	}
}

func tcpPair(b *testing.B) (client, server net.Conn) {
	ln := listen(b)
	done := make(chan net.Conn)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			b.Error(err)
		}
		done <- c
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	server = <-done
	b.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// benchCopy moves the region from w to a receive buffer read from r, once per iteration.
func benchCopy(b *testing.B, w io.Writer, r io.Reader, src *Region) {
	dst := make([]byte, MaxPayload)
	data := src.Bytes()
	b.SetBytes(benchSize)
	b.ResetTimer()
	for b.Loop() {
		errc := make(chan error, 1)
		go func() {
			for off := 0; off < len(data); off += MaxPayload {
				if _, err := w.Write(data[off : off+MaxPayload]); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
		for got := 0; got < len(data); {
			n, err := r.Read(dst)
			if err != nil {
				b.Fatal(err)
			}
			got += n
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
	}
}

func benchLethe(b *testing.B, srcRegion *Region, streams int) {
	ctx := b.Context()
	dstRegion := testRegion(b, benchSize)
	ln := listen(b)
	ids := newIdentities(b)
	srcAgent, err := NewSource(SourceConfig{MigrationID: "bench", Peer: ln.Addr().String(), Streams: streams, Region: srcRegion})
	if err != nil {
		b.Fatal(err)
	}
	dstAgent, err := NewDestination(DestinationConfig{MigrationID: "bench", Region: dstRegion})
	if err != nil {
		b.Fatal(err)
	}
	tk := testKey(b, 1)
	type acceptResult struct {
		conns   []net.Conn
		session *confirmed
		err     error
	}
	accepted := make(chan acceptResult, 1)
	go func() {
		c, hs, err := dstAgent.accept(ctx, ln, ids.destination(Keys{TK: tk}))
		accepted <- acceptResult{c, hs, err}
	}()
	srcConns, hs, err := srcAgent.connect(ctx, ids.source(Keys{TK: tk}))
	if err != nil {
		b.Fatal(err)
	}
	defer hs.destroy()
	a := <-accepted
	if a.err != nil {
		b.Fatal(a.err)
	}
	defer a.session.destroy()
	var received, target atomic.Int64
	arrived := make(chan struct{}, 1)
	dst, err := newSession(ctx, sessionConfig{role: roleDestination, secret: a.session.secret, transcript: a.session.transcript,
		conns: a.conns, region: dstRegion, log: srcAgent.log,
		onPages: func(n int) {
			if received.Add(int64(n)) >= target.Load() {
				select {
				case arrived <- struct{}{}:
				default:
				}
			}
		}})
	if err != nil {
		b.Fatal(err)
	}
	src, err := newSession(ctx, sessionConfig{role: roleSource, secret: hs.secret, transcript: hs.transcript,
		conns: srcConns, region: srcRegion, log: srcAgent.log})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { src.close(); dst.close() }()
	set := srcRegion.fullSet()
	b.SetBytes(benchSize)
	b.ResetTimer()
	for b.Loop() {
		target.Add(int64(srcRegion.Pages()))
		if err := src.sendPageSet(set); err != nil {
			b.Fatal(err)
		}
		for received.Load() < target.Load() {
			select {
			case <-arrived:
			case <-dst.ctx.Done():
				b.Fatal(dst.err())
			case <-time.After(time.Minute):
				b.Fatal("pages did not arrive")
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(src.mem.Load()+dst.mem.Load())/float64(streams), "B/stream")
}

func selfSigned(b *testing.B) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "lethe"}, DNSNames: []string{"lethe"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func BenchmarkAESGCM(b *testing.B) {
	block, err := aes.NewCipher(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	pt := make([]byte, MaxPayload)
	out := make([]byte, 0, MaxPayload+tagSize)
	nonce := make([]byte, aead.NonceSize())
	b.SetBytes(MaxPayload)
	for b.Loop() {
		out = aead.Seal(out[:0], nonce, pt, nil)
	}
}

// BenchmarkDowntime migrates guests of 256 MiB, 1 GiB, 2 GiB and 4 GiB, each under the same
// workload (20,000 uniformly random page writes per second) over two streams, and reports:
//
//	downtime-ms  SourceResult.Downtime: from pausing the guest to the verified commit
//	total-ms     Source.Run, from dialing to its return (erasure of the source included)
//	prepare-ms   Destination.Prepare of a receive region made for the migration
//
// Each size runs twice: chunk-digests is the data plane as it is; full-hash is the baseline
// that hashes all of memory in the pause on both sides (RehashPausedMemory, and the
// destination's rehashReceived), as the data plane did before chunk digests.
//
// A 16 MiB guest whose workload writes all of its memory every few milliseconds (2,000,000
// sequential page writes per second), which pre-copy cannot converge without throttling,
// runs with auto-converge (auto-converge) and without (no-throttle, paused after 30 rounds);
// its lines also report rounds and final-pages, the pages sent while the guest was paused.
func BenchmarkDowntime(b *testing.B) {
	for _, size := range []int64{256 << 20, 1 << 30, 2 << 30, 4 << 30} {
		for _, mode := range []string{"chunk-digests", "full-hash"} {
			b.Run(fmt.Sprintf("%dMiB/%s", size>>20, mode), func(b *testing.B) {
				benchDowntime(b, size, downtimeCase{fullHash: mode == "full-hash", rate: 20000, pattern: Uniform})
			})
		}
	}
	for _, mode := range []string{"auto-converge", "no-throttle"} {
		b.Run("16MiB-hot/"+mode, func(b *testing.B) {
			benchDowntime(b, 16<<20, downtimeCase{rate: 2_000_000, pattern: Sequential, autoConverge: mode == "auto-converge", rounds: true})
		})
	}
}

// downtimeCase is the workload and settings of one BenchmarkDowntime case.
type downtimeCase struct {
	fullHash     bool
	rate         int
	pattern      Pattern
	autoConverge bool
	// rounds reports the rounds and the final round's pages as metrics.
	rounds bool
}

func benchDowntime(b *testing.B, size int64, tc downtimeCase) {
	src := testRegion(b, size)
	ids := newIdentities(b)
	var downtime, total, prepare time.Duration
	var rounds, finalPages int
	for b.Loop() {
		b.StopTimer()
		fillRegion(src, 1)
		dst, err := NewRegion(size)
		if err != nil {
			b.Fatal(err)
		}
		w, err := NewWorkload(WorkloadConfig{Region: src, Rate: tc.rate, Pattern: tc.pattern, Seed: 3})
		if err != nil {
			b.Fatal(err)
		}
		ctx, stop := context.WithCancel(b.Context())
		go w.Run(ctx)
		ln := listen(b)
		srcAgent, err := NewSource(SourceConfig{
			MigrationID: "bench", Peer: ln.Addr().String(), Streams: 2, Region: src, Guest: w,
			RehashPausedMemory: tc.fullHash, AutoConverge: tc.autoConverge,
		})
		if err != nil {
			b.Fatal(err)
		}
		dstAgent, err := NewDestination(DestinationConfig{MigrationID: "bench", Region: dst, rehashReceived: tc.fullHash})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()

		t0 := time.Now()
		if _, err := dstAgent.Prepare(ctx); err != nil {
			b.Fatal(err)
		}
		prepare += time.Since(t0)
		dstErr := make(chan error, 1)
		go func() {
			_, err := dstAgent.Receive(ctx, ln, ids.destination(Keys{TK: testKey(b, 1), MDK: testKey(b, 9)}))
			dstErr <- err
		}()
		t1 := time.Now()
		res, err := srcAgent.Run(ctx, ids.source(Keys{TK: testKey(b, 1), MDK: testKey(b, 5)}))
		total += time.Since(t1)
		if err != nil {
			b.Fatal(err)
		}
		if err := <-dstErr; err != nil {
			b.Fatal(err)
		}
		downtime += res.Downtime
		rounds += len(res.Rounds)
		finalPages += res.Rounds[len(res.Rounds)-1].Pages
		for _, r := range res.Rounds {
			b.Logf("round %d: %d pages in %v, %d dirty, throttle %d%% (final %v)", r.Round, r.Pages, r.Duration, r.Dirty, r.Throttle, r.Final)
		}

		b.StopTimer()
		stop()
		dst.Close()
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(float64(downtime.Milliseconds())/n, "downtime-ms")
	b.ReportMetric(float64(total.Milliseconds())/n, "total-ms")
	b.ReportMetric(float64(prepare.Milliseconds())/n, "prepare-ms")
	if tc.rounds {
		b.ReportMetric(float64(rounds)/n, "rounds")
		b.ReportMetric(float64(finalPages)/n, "final-pages")
	}
}

// BenchmarkPrepare makes a 256 MiB receive region and scrubs it, as Destination.Prepare does.
func BenchmarkPrepare(b *testing.B) {
	const size = 256 << 20
	b.SetBytes(size)
	for b.Loop() {
		r, err := NewRegion(size)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := r.Scrub(); err != nil {
			b.Fatal(err)
		}
		r.Close()
	}
}
