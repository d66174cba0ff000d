package dataplane

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/seal"
)

type migration struct {
	src     *Source
	dst     *Destination
	srcRes  SourceResult
	srcErr  error
	dstRes  DestinationResult
	dstErr  error
	clean   attest.CleanMemoryStatement
	srcKeys Keys
	dstKeys Keys
}

// run runs both sides to completion.
func (m *migration) run(t *testing.T, ln net.Listener) {
	t.Helper()
	ctx := t.Context()
	var err error
	m.clean, err = m.dst.Prepare(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { m.dstRes, m.dstErr = m.dst.Receive(ctx, ln, m.dstKeys) })
	m.srcRes, m.srcErr = m.src.Run(ctx, m.srcKeys)
	wg.Wait()
}

func TestMigrateMemoryUnderWorkload(t *testing.T) {
	tests := map[string]struct {
		streams   int
		zeroPages bool
		pattern   Pattern
	}{
		"1-stream":              {streams: 1, pattern: Uniform},
		"3-streams":             {streams: 3, pattern: Hotspot},
		"4-streams-zero-elided": {streams: 4, zeroPages: true, pattern: Sequential},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			const size = 32 << 20
			srcRegion, dstRegion := testRegion(t, size), testRegion(t, size)
			fillRegion(srcRegion, 1)
			fillRegion(dstRegion, 2) // a previous guest's data, to be scrubbed
			w, err := NewWorkload(WorkloadConfig{Region: srcRegion, Rate: 200000, Pattern: tc.pattern, Seed: 3})
			if err != nil {
				t.Fatal(err)
			}
			ctx, stop := context.WithCancel(t.Context())
			defer stop()
			go w.Run(ctx)
			pauser := &hashingPauser{w: w, r: srcRegion}
			var progress []Progress
			ln := listen(t)
			src, err := NewSource(SourceConfig{
				MigrationID: "mig-" + name, Peer: ln.Addr().String(), Streams: tc.streams,
				Region: srcRegion, Guest: pauser, MaxRounds: 5, ConvergedPages: 64,
				ZeroPageElision: tc.zeroPages, Progress: func(p Progress) { progress = append(progress, p) },
				ProgressInterval: time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			dst, err := NewDestination(DestinationConfig{
				MigrationID: "mig-" + name, Region: dstRegion, ZeroPageElision: tc.zeroPages,
				LaunchMeasurement: []byte{1, 2, 3},
			})
			if err != nil {
				t.Fatal(err)
			}
			dstMDK := testKey(t, 9)
			ids := newIdentities(t)
			m := &migration{src: src, dst: dst,
				srcKeys: ids.source(Keys{TK: testKey(t, 1), MDK: testKey(t, 5)}),
				dstKeys: ids.destination(Keys{TK: testKey(t, 1), MDK: dstMDK})}
			m.run(t, ln)
			if m.srcErr != nil || m.dstErr != nil {
				t.Fatalf("source: %v; destination: %v", m.srcErr, m.dstErr)
			}
			if !pauser.paused {
				t.Fatal("guest never paused")
			}
			if got := regionHash(dstRegion); got != pauser.hash {
				t.Fatal("destination memory differs from the source's at cutover")
			}
			if len(m.srcRes.MemoryDigest) != 32 || !bytes.Equal(m.srcRes.MemoryDigest, m.dstRes.MemoryDigest) {
				t.Errorf("memory digests: source %x, destination %x", m.srcRes.MemoryDigest, m.dstRes.MemoryDigest)
			}
			if want := MemoryRoot(dstRegion); !bytes.Equal(m.dstRes.MemoryDigest, want) {
				t.Errorf("destination digest %x is not the memory root of its region %x", m.dstRes.MemoryDigest, want)
			}
			if err := m.srcRes.Commit.Verify(testKeyBytes(1), "mig-"+name); err != nil {
				t.Fatalf("verifying commit: %v", err)
			}
			if diff := cmp.Diff(m.dstRes.Commit, m.srcRes.Commit); diff != "" {
				t.Errorf("commit (-dst +src):\n%s", diff)
			}
			wantClean := attest.CleanMemoryStatement{Type: attest.StatementCleanMemory, Zeroed: true, VerifiedZero: true, Bytes: size, LaunchMeasurement: []byte{1, 2, 3}}
			if diff := cmp.Diff(wantClean, m.clean); diff != "" {
				t.Errorf("clean-memory statement (-want +got):\n%s", diff)
			}
			wantErasure := attest.ErasureStatement{
				Type: attest.StatementErasure, MigrationID: "mig-" + name,
				KeysZeroized:  []string{attest.KeyTransfer, attest.KeyMemoryData},
				PagesScrubbed: size / PageSize, PageBytesScrubbed: size,
			}
			if diff := cmp.Diff(wantErasure, m.srcRes.Erasure); diff != "" {
				t.Errorf("erasure statement (-want +got):\n%s", diff)
			}
			if !isZeroRegion(srcRegion) {
				t.Error("source region not scrubbed")
			}
			if !m.srcKeys.TK.Destroyed() || !m.srcKeys.MDK.Destroyed() || !m.dstKeys.TK.Destroyed() {
				t.Error("keys not destroyed")
			}
			if dstMDK.Destroyed() {
				t.Error("destination destroyed MDK of the epoch it now holds")
			}
			checkProgress(t, progress, srcRegion.Pages())

		})
	}
}

// checkProgress checks a source's reports: one per round, the first of all pages, the last
// final; between them, reports within a round (a round of 32 MiB lasts longer than the 1 ms
// interval) whose totals only grow, up to the round's own report.
func checkProgress(t *testing.T, progress []Progress, pages int) {
	t.Helper()
	var rounds []Progress
	inRound := 0
	var last int64
	for _, p := range progress {
		if p.TotalBytes < last {
			t.Errorf("progress went back: %d bytes after %d (%+v)", p.TotalBytes, last, p)
		}
		last = p.TotalBytes
		if !p.InRound {
			rounds = append(rounds, p)
			continue
		}
		inRound++
		if p.Final && len(rounds) == 0 || p.Pages < 0 || p.Pages > pages {
			t.Errorf("report within round %d: %+v", p.Round, p)
		}
	}
	if len(rounds) < 2 || !rounds[len(rounds)-1].Final || rounds[0].Pages != pages {
		t.Errorf("round reports: %+v", rounds)
	}
	if inRound == 0 {
		t.Error("no report within a round")
	}
}

func isZeroRegion(r *Region) bool {
	for i := range r.Pages() {
		if !isZero(r.Page(i)) {
			return false
		}
	}
	return true
}

// tamperConn flips one bit of the byte at offset at of what is written through it.
type tamperConn struct {
	net.Conn
	mu sync.Mutex
	n  int
	at int
}

func (c *tamperConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	if c.at >= c.n && c.at < c.n+len(b) {
		b = append([]byte(nil), b...)
		b[c.at-c.n] ^= 1
	}
	c.n += len(b)
	c.mu.Unlock()
	return c.Conn.Write(b)
}

func TestMigrateTamperedPayloadAbortsAndErasesDestination(t *testing.T) {
	const size = 4 << 20
	srcRegion, dstRegion := testRegion(t, size), testRegion(t, size)
	fillRegion(srcRegion, 1)
	ln := listen(t)
	first := true
	var d net.Dialer
	src, err := NewSource(SourceConfig{
		MigrationID: "m", Peer: ln.Addr().String(), Region: srcRegion, Streams: 2,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			if err != nil || !first {
				return c, err
			}
			first = false
			// Past the handshake and the first frame header: inside a page payload.
			return &tamperConn{Conn: c, at: 2000 + headerSize + 100}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	spool, err := NewSpool(t.TempDir()+"/spool", testKey(t, 9))
	if err != nil {
		t.Fatal(err)
	}
	if err := spool.Put(1, []byte("spilled page")); err != nil {
		t.Fatal(err)
	}
	dst, err := NewDestination(DestinationConfig{MigrationID: "m", Region: dstRegion, Spool: spool})
	if err != nil {
		t.Fatal(err)
	}
	ids := newIdentities(t)
	m := &migration{src: src, dst: dst,
		srcKeys: ids.source(Keys{TK: testKey(t, 1), MDK: testKey(t, 5)}),
		dstKeys: ids.destination(Keys{TK: testKey(t, 1), MDK: testKey(t, 9)})}
	m.run(t, ln)
	if !errors.Is(m.dstErr, ErrFrameAuthentication) {
		t.Errorf("destination: got %v, want ErrFrameAuthentication", m.dstErr)
	}
	if !errors.Is(m.srcErr, ErrPeerAborted) {
		t.Errorf("source: got %v, want ErrPeerAborted", m.srcErr)
	}
	if m.srcKeys.MDK.Destroyed() {
		t.Error("source destroyed MDK without a commit")
	}
	want := &attest.ErasureStatement{
		Type: attest.StatementErasure, MigrationID: "m",
		KeysZeroized:  []string{attest.KeyTransfer, attest.KeyMemoryData},
		PagesScrubbed: size / PageSize, PageBytesScrubbed: size, SpoolBytesScrubbed: uint64(spool.size),
	}
	if diff := cmp.Diff(want, m.dstRes.Erasure); diff != "" {
		t.Errorf("erasure (-want +got):\n%s", diff)
	}
	if !isZeroRegion(dstRegion) {
		t.Error("destination region not scrubbed")
	}
}

// halfConn is one end of an in-memory full-duplex byte stream with half-close.
type halfConn struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func (c *halfConn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *halfConn) Write(b []byte) (int, error) { return c.w.Write(b) }
func (c *halfConn) CloseWrite() error           { return c.w.Close() }
func (c *halfConn) Close() error                { c.r.Close(); return c.w.Close() }

func duplex() (*halfConn, *halfConn) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &halfConn{r: ar, w: aw}, &halfConn{r: br, w: bw}
}

func TestMigrateRefusesMismatch(t *testing.T) {
	tests := map[string]struct {
		src SourceConfig
		dst DestinationConfig
	}{
		"migration-id":     {src: SourceConfig{MigrationID: "a"}, dst: DestinationConfig{MigrationID: "b"}},
		"zero-pages":       {src: SourceConfig{MigrationID: "a", ZeroPageElision: true}, dst: DestinationConfig{MigrationID: "a"}},
		"too-many-streams": {src: SourceConfig{MigrationID: "a", Streams: 5}, dst: DestinationConfig{MigrationID: "a", MaxStreams: 4}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			ln := listen(t)
			tc.src.Peer, tc.src.Region = ln.Addr().String(), testRegion(t, 1<<20)
			tc.dst.Region = testRegion(t, 1<<20)
			var rejected <-chan string
			tc.dst.Logger, rejected = rejections()
			src, err := NewSource(tc.src)
			if err != nil {
				t.Fatal(err)
			}
			dst, err := NewDestination(tc.dst)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := dst.Prepare(t.Context()); err != nil {
				t.Fatal(err)
			}
			ids := newIdentities(t)
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error)
			go func() {
				_, err := dst.Receive(ctx, ln, ids.destination(Keys{TK: testKey(t, 1)}))
				done <- err
			}()
			_, err = src.Run(t.Context(), ids.source(Keys{TK: testKey(t, 1)}))
			if !errors.Is(err, ErrKeyConfirmation) {
				t.Errorf("source: got %v, want ErrKeyConfirmation (destination closed)", err)
			}
			<-rejected
			cancel()
			if err := <-done; !errors.Is(err, ErrHandshake) {
				t.Errorf("destination: got %v, want ErrHandshake", err)
			}
		})
	}
}

// sneakyPauser pauses the workload and then writes a page without marking it dirty, as a
// writer that bypasses dirty tracking would: the final round does not resend the page.
type sneakyPauser struct {
	w *Workload
	r *Region
}

func (p *sneakyPauser) Pause(ctx context.Context) error {
	if err := p.w.Pause(ctx); err != nil {
		return err
	}
	p.r.Page(3)[0] ^= 0xff
	return nil
}

func (p *sneakyPauser) Resume(ctx context.Context) error { return p.w.Resume(ctx) }

// TestMigrateMemoryDigestMismatchIsNotAcknowledged: with RehashPausedMemory the source hashes
// its paused memory, not what it sent, so a writer that bypassed dirty tracking shows as a
// mismatch and the destination does not commit.
func TestMigrateMemoryDigestMismatchIsNotAcknowledged(t *testing.T) {
	const size = 4 << 20
	srcRegion, dstRegion := testRegion(t, size), testRegion(t, size)
	fillRegion(srcRegion, 1)
	w, err := NewWorkload(WorkloadConfig{Region: srcRegion, Rate: 1000, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	ln := listen(t)
	src, err := NewSource(SourceConfig{
		MigrationID: "m-digest", Peer: ln.Addr().String(), Region: srcRegion, Guest: &sneakyPauser{w: w, r: srcRegion},
		RehashPausedMemory: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewDestination(DestinationConfig{MigrationID: "m-digest", Region: dstRegion})
	if err != nil {
		t.Fatal(err)
	}
	ids := newIdentities(t)
	m := &migration{src: src, dst: dst,
		srcKeys: ids.source(Keys{TK: testKey(t, 1), MDK: testKey(t, 5)}),
		dstKeys: ids.destination(Keys{TK: testKey(t, 1), MDK: testKey(t, 9)})}
	m.run(t, ln)
	if !errors.Is(m.dstErr, ErrIncomplete) || !strings.Contains(m.dstErr.Error(), "memory digest mismatch") {
		t.Errorf("destination: got %v, want ErrIncomplete naming the memory digest mismatch", m.dstErr)
	}
	if m.srcErr == nil || !strings.Contains(m.srcErr.Error(), "memory digest mismatch") {
		t.Errorf("source: got %v, want the destination's abort naming the memory digest mismatch", m.srcErr)
	}
	if m.dstRes.Erasure == nil || !isZeroRegion(dstRegion) {
		t.Error("destination not erased after the mismatch")
	}
	if m.srcKeys.MDK.Destroyed() {
		t.Error("source destroyed MDK although the migration did not commit")
	}
}

// TestMigrateRefusesPeerWithoutGrantedKey: an agent that holds TK (the keybroker may seal it
// again in a repeated release) but not the HPKE key the other end's grant names cannot take
// part: key confirmation fails on both sides and not one page leaves the source.
func TestMigrateRefusesPeerWithoutGrantedKey(t *testing.T) {
	tests := map[string]struct {
		// impostor replaces one end's identity with a key no grant names.
		impostor func(ids *identities, other *seal.PrivateKey)
	}{
		"destination": {impostor: func(ids *identities, other *seal.PrivateKey) { ids.dst = other }},
		"source":      {impostor: func(ids *identities, other *seal.PrivateKey) { ids.src = other }},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			const id = "mig-impostor"
			granted := newIdentities(t)
			ln := listen(t)
			srcRegion, dstRegion := testRegion(t, 1<<20), testRegion(t, 1<<20)
			fillRegion(srcRegion, 1)
			var (
				mu    sync.Mutex
				conns []*recordConn
				d     net.Dialer
			)
			src, err := NewSource(SourceConfig{
				MigrationID: id, Peer: ln.Addr().String(), Region: srcRegion, Streams: 2,
				Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
					c, err := d.DialContext(ctx, network, addr)
					if err != nil {
						return nil, err
					}
					rc := &recordConn{Conn: c}
					mu.Lock()
					conns = append(conns, rc)
					mu.Unlock()
					return rc, nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			log, rejected := rejections()
			dst, err := NewDestination(DestinationConfig{MigrationID: id, Region: dstRegion, Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			// Each end expects the granted peer; one end holds another key.
			srcKeys := granted.source(Keys{TK: testKey(t, 1), MDK: testKey(t, 5)})
			dstKeys := granted.destination(Keys{TK: testKey(t, 1)})
			actual := granted
			tc.impostor(&actual, testIdentity(t))
			srcKeys.Identity, dstKeys.Identity = actual.src, actual.dst
			if _, err := dst.Prepare(t.Context()); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			type received struct {
				res DestinationResult
				err error
			}
			done := make(chan received)
			go func() {
				res, err := dst.Receive(ctx, ln, dstKeys)
				done <- received{res, err}
			}()
			_, srcErr := src.Run(t.Context(), srcKeys)
			reason := <-rejected
			cancel()
			got := <-done
			if !strings.Contains(reason, ErrKeyConfirmation.Error()) {
				t.Errorf("destination rejected the connection with %q, want key confirmation failed", reason)
			}
			if !errors.Is(srcErr, ErrKeyConfirmation) || !strings.Contains(srcErr.Error(), "HPKE key") {
				t.Errorf("source: got %v, want ErrKeyConfirmation naming the HPKE key", srcErr)
			}
			if !errors.Is(got.err, ErrKeyConfirmation) {
				t.Errorf("destination: got %v, want ErrKeyConfirmation", got.err)
			}
			if got.res.Streams != 0 {
				t.Errorf("destination established %d streams", got.res.Streams)
			}
			mu.Lock()
			defer mu.Unlock()
			helloLen := prefixSize + helloFixed + len(id) + encLenSize + seal.EncapsulatedSize
			if len(conns) != 1 || len(conns[0].sent()) != helloLen {
				var sent []int
				for _, c := range conns {
					sent = append(sent, len(c.sent()))
				}
				t.Errorf("source sent %v bytes on its connections, want its hello (%d bytes) only", sent, helloLen)
			}
		})
	}
}

// TestCommitAckVerifiesWithGrant: the acknowledgement a real transfer produces is the one the
// keybroker checks, with nothing but TK and the migration id.
func TestCommitAckVerifiesWithGrant(t *testing.T) {
	const id = "mig-commit"
	srcRegion, dstRegion := testRegion(t, 1<<20), testRegion(t, 1<<20)
	fillRegion(srcRegion, 1)
	ln := listen(t)
	ids := newIdentities(t)
	src, err := NewSource(SourceConfig{MigrationID: id, Peer: ln.Addr().String(), Region: srcRegion, Streams: 2})
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewDestination(DestinationConfig{MigrationID: id, Region: dstRegion})
	if err != nil {
		t.Fatal(err)
	}
	m := &migration{src: src, dst: dst, srcKeys: ids.source(Keys{TK: testKey(t, 1)}), dstKeys: ids.destination(Keys{TK: testKey(t, 1)})}
	m.run(t, ln)
	if m.srcErr != nil || m.dstErr != nil {
		t.Fatalf("source: %v; destination: %v", m.srcErr, m.dstErr)
	}
	encoded, err := json.Marshal(m.srcRes.Commit)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := grant.ParseCommitAck(encoded)
	if err != nil {
		t.Fatal(err)
	}
	flipped := *parsed
	flipped.MAC = bytes.Clone(parsed.MAC)
	flipped.MAC[7] ^= 1
	tests := map[string]struct {
		ack     *grant.CommitAck
		tk      []byte
		id      string
		wantErr error
	}{
		"as-received":     {ack: parsed, tk: testKeyBytes(1), id: id},
		"flipped-mac":     {ack: &flipped, tk: testKeyBytes(1), id: id, wantErr: grant.ErrCommitAck},
		"other-tk":        {ack: parsed, tk: testKeyBytes(2), id: id, wantErr: grant.ErrCommitAck},
		"other-migration": {ack: parsed, tk: testKeyBytes(1), id: "mig-other", wantErr: grant.ErrCommitAck},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := tc.ack.Verify(tc.tk, tc.id)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
		})
	}
	if diff := cmp.Diff(m.dstRes.Commit, m.srcRes.Commit); diff != "" {
		t.Errorf("commit (-dst +src):\n%s", diff)
	}
}

func TestCheckAck(t *testing.T) {
	transcript := bytes.Repeat([]byte{3}, 32)
	mac, err := grant.CommitMAC(testKeyBytes(1), "m", transcript)
	if err != nil {
		t.Fatal(err)
	}
	ack := append(bytes.Clone(transcript), mac...)
	flip := func(i int) []byte {
		b := bytes.Clone(ack)
		b[i] ^= 1
		return b
	}
	tests := map[string]struct {
		ack     []byte
		wantErr error
	}{
		"ok":                 {ack: ack},
		"flipped-mac":        {ack: flip(40), wantErr: ErrCommitAck},
		"another-transcript": {ack: flip(0), wantErr: ErrCommitAck},
		"transcript-only":    {ack: transcript, wantErr: ErrCommitAck},
		"short":              {ack: ack[:10], wantErr: ErrCommitAck},
		"long":               {ack: append(bytes.Clone(ack), 0), wantErr: ErrCommitAck},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			commit := Commit{MigrationID: "m", Transcript: transcript}
			err := checkAck(&commit, tc.ack, testKey(t, 1))
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if err == nil && !bytes.Equal(commit.MAC, mac) {
				t.Errorf("MAC %x, want %x", commit.MAC, mac)
			}
		})
	}
}

// TestRunRequiresHandshakeKeys: neither end starts without the keys the handshake proves.
func TestRunRequiresHandshakeKeys(t *testing.T) {
	ids := newIdentities(t)
	zeroized := testIdentity(t)
	zeroized.Zeroize()
	tests := map[string]struct {
		identity *seal.PrivateKey
		peerKey  []byte
		wantErr  string
	}{
		"no-identity":        {peerKey: ids.dst.PublicKey(), wantErr: "no identity key"},
		"no-peer-key":        {identity: ids.src, wantErr: "no peer key"},
		"malformed-peer-key": {identity: ids.src, peerKey: ids.dst.PublicKey()[:100], wantErr: "checking the peer key"},
		"zeroized-identity":  {identity: zeroized, peerKey: ids.dst.PublicKey(), wantErr: "checking the identity key"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			src, err := NewSource(SourceConfig{MigrationID: "m", Peer: "127.0.0.1:1", Region: testRegion(t, PageSize),
				Dial: func(context.Context, string, string) (net.Conn, error) {
					t.Error("source dialled")
					return nil, errors.New("no")
				}})
			if err != nil {
				t.Fatal(err)
			}
			dst, err := NewDestination(DestinationConfig{MigrationID: "m", Stream: &halfConn{}})
			if err != nil {
				t.Fatal(err)
			}
			ln := listen(t)
			_, srcErr := src.Run(t.Context(), Keys{TK: testKey(t, 1), Identity: tc.identity, PeerKey: tc.peerKey})
			_, dstErr := dst.Receive(t.Context(), ln, Keys{TK: testKey(t, 1), Identity: tc.identity, PeerKey: tc.peerKey})
			for side, err := range map[string]error{"source": srcErr, "destination": dstErr} {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("%s: got %v, want %q", side, err, tc.wantErr)
				}
			}
			if _, err := ln.Accept(); err == nil {
				t.Error("destination left its listener open")
			}
		})
	}
}
