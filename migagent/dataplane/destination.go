package dataplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
)

// DestinationConfig configures the destination side of one migration.
type DestinationConfig struct {
	// MigrationID names the migration; a source proposing another is refused. Required,
	// at most 255 bytes.
	MigrationID string
	// Region receives the guest's memory; its size must equal the source's. Nil means no
	// memory transfer (byte stream only).
	Region *Region
	// Stream is the local end of the byte stream (the destination hypervisor's incoming
	// migration connection), as SourceConfig.Stream. Nil means none.
	Stream io.ReadWriteCloser
	// Lanes allows a source to send a byte stream on every stream (SourceConfig.Lanes): it
	// gives the local end of the one on stream i, from 1. Nil refuses such a source.
	Lanes func(i int) io.ReadWriteCloser
	// LaunchMeasurement is the launch measurement of the freshly launched target context,
	// stated in the clean-memory statement. Nil means none.
	LaunchMeasurement []byte
	// MaxStreams is the most parallel streams accepted. Zero means 16; at most 64.
	MaxStreams int
	// ZeroPageElision allows zero pages sent as a flag (policy transport.zeroPageElision).
	// False refuses a source that proposes it.
	ZeroPageElision bool
	// Spool holds what was kept of the incoming guest outside Region; it is scrubbed if the
	// migration aborts. Nil means none.
	Spool *Spool
	// HandshakeTimeout bounds each connection's key confirmation. Zero means 10 s.
	HandshakeTimeout time.Duration
	// DrainTimeout bounds the wait, after the acknowledgement, for the source to close its
	// connections. Zero means 10 s.
	DrainTimeout time.Duration
	// Logger receives debug and info records. Nil means none.
	Logger *slog.Logger

	// rehashReceived hashes the whole received region again at FIN, as the data plane did
	// before chunk digests: the baseline of the downtime benchmark.
	rehashReceived bool
}

// DestinationResult is what Receive leaves the destination with.
type DestinationResult struct {
	// Commit is the acknowledgement sent, when the migration committed.
	Commit Commit
	// Erasure, when the migration failed, states what the destination zeroized and scrubbed.
	Erasure *attest.ErasureStatement
	// Streams is the number of streams the source used.
	Streams int
	// MemoryDigest is the memory root (see MemoryRoot) of the received region, equal to the
	// digest the source sent in its FINs (Receive refuses to acknowledge otherwise). Nil
	// without a region.
	MemoryDigest []byte
}

// Destination runs the destination side of one migration: Prepare, then Receive (or Abort).
// It is single use.
type Destination struct {
	cfg      DestinationConfig
	log      *slog.Logger
	mu       sync.Mutex
	prepared bool
	used     atomic.Bool
}

// NewDestination checks cfg and fills in defaults.
func NewDestination(cfg DestinationConfig) (*Destination, error) {
	if cfg.MigrationID == "" || len(cfg.MigrationID) > maxIDLen {
		return nil, fmt.Errorf("creating destination: migration id must have 1 to %d bytes", maxIDLen)
	}
	if cfg.Region == nil && cfg.Stream == nil {
		return nil, errors.New("creating destination: nothing to receive (no region, no stream)")
	}
	if cfg.MaxStreams < 0 || cfg.MaxStreams > maxStreams {
		return nil, fmt.Errorf("creating destination: at most %d streams", maxStreams)
	}
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = 16
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 10 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Destination{cfg: cfg, log: log.With("component", "migagent", "role", "destination", "migration", cfg.MigrationID)}, nil
}

// Prepare scrubs the receive region (zeroes written, then every byte read back) and returns
// the clean-memory statement for the destination's evidence: Zeroed and VerifiedZero. It
// returns an error wrapping ErrNotZero if the region does not read back as zero.
func (d *Destination) Prepare(ctx context.Context) (attest.CleanMemoryStatement, error) {
	st := attest.CleanMemoryStatement{Type: attest.StatementCleanMemory, LaunchMeasurement: d.cfg.LaunchMeasurement}
	if d.cfg.Region != nil {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		n, err := d.cfg.Region.Scrub()
		if err != nil {
			return st, fmt.Errorf("scrubbing receive region: %w", err)
		}
		st.Zeroed, st.VerifiedZero, st.Bytes = true, true, uint64(n)
	}
	d.mu.Lock()
	d.prepared = true
	d.mu.Unlock()
	return st, nil
}

func (d *Destination) params() handshakeParams {
	c := &d.cfg
	return newHandshakeParams(c.MigrationID, c.MaxStreams, c.Region, c.ZeroPageElision, c.Stream, c.Lanes != nil)
}

// Receive accepts the source's streams on ln (which it closes when they have all joined or
// when it returns), confirms keys (TK, and that each end holds the HPKE key the other's
// grant names: keys.Identity here, keys.PeerKey there), receives the transfer, checks it is
// complete and sends the commit acknowledgement, MACed under keys.TK. Connections that fail
// key confirmation are dropped and Receive keeps listening until ctx ends.
//
// Receive destroys keys.TK whatever happens, and never keys.Identity. It returns an error,
// having accepted nothing, if keys.Identity is missing or zeroized or keys.PeerKey is
// missing or malformed. If the migration fails, it erases the destination (zeroizes keys.TK
// and keys.MDK, scrubs the region and spool) and returns the erasure statement in the result
// together with the error. A received region whose memory root differs from the memory digest
// in the source's FINs is not acknowledged: the error wraps ErrIncomplete and says "memory
// digest mismatch". Errors wrap ErrNotPrepared, ErrUsed, ErrIncomplete, ErrPeerAborted,
// ErrKeyConfirmation or ErrHandshake (only when ctx ended after failed attempts), or are
// *FrameError or the transport's.
func (d *Destination) Receive(ctx context.Context, ln net.Listener, keys Keys) (DestinationResult, error) {
	defer keys.TK.Destroy()
	if !d.used.CompareAndSwap(false, true) {
		ln.Close()
		return DestinationResult{}, fmt.Errorf("receiving: %w", ErrUsed)
	}
	d.mu.Lock()
	prepared := d.prepared
	d.mu.Unlock()
	if d.cfg.Region != nil && !prepared {
		ln.Close()
		return DestinationResult{}, fmt.Errorf("receiving: %w", ErrNotPrepared)
	}
	if err := checkHandshakeKeys(keys.Identity, keys.PeerKey); err != nil {
		ln.Close()
		return DestinationResult{}, fmt.Errorf("receiving: %w", err)
	}
	res, err := d.receive(ctx, ln, keys)
	if err != nil {
		st, eerr := erase(d.cfg.MigrationID, keys, d.cfg.Region, d.cfg.Spool)
		res.Erasure = &st
		d.log.Info("Migration failed, destination erased", "error", err)
		return res, errors.Join(err, eerr)
	}
	d.log.Info("Migration committed", "streams", res.Streams)
	return res, nil
}

// Abort erases the destination without (or instead of) receiving: it zeroizes the keys it
// is given and scrubs the region and spool. It returns an error wrapping ErrNotZero if the
// region did not read back as zero.
func (d *Destination) Abort(ctx context.Context, keys Keys) (attest.ErasureStatement, error) {
	d.used.Store(true)
	return erase(d.cfg.MigrationID, keys, d.cfg.Region, d.cfg.Spool)
}

type accepted struct {
	conn    net.Conn
	index   int
	session *confirmed // the hello's
	err     error
}

// accept runs key confirmation on incoming connections until a source has confirmed keys
// and joined all its streams. The caller destroys the session it returns.
func (d *Destination) accept(ctx context.Context, ln net.Listener, keys Keys) (_ []net.Conn, _ *confirmed, err error) {
	var (
		wg          sync.WaitGroup
		mu          sync.Mutex
		session     *confirmed // the first hello that confirmed keys
		established = make(chan struct{})
	)
	defer func() { // runs last, after ln is closed and ctx cancelled
		wg.Wait()
		if err != nil {
			session.destroy()
		}
	}()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer ln.Close()
	stopClose := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopClose()

	results := make(chan accepted)
	handle := func(conn net.Conn) {
		defer wg.Done()
		stop := withDeadline(ctx, conn, d.cfg.HandshakeTimeout)
		a := accepted{conn: conn}
		typ, err := readPrefix(conn)
		switch {
		case err != nil:
			a.err = err
		case typ == msgHello:
			mu.Lock()
			taken := session != nil
			mu.Unlock()
			if taken {
				a.err = fmt.Errorf("%w: second hello", ErrHandshake)
				break
			}
			a.session, a.err = serverHello(conn, d.params(), keys)
			if a.err == nil {
				mu.Lock()
				if session == nil {
					session = a.session
					close(established)
				} else {
					a.session.destroy()
					a.session, a.err = nil, fmt.Errorf("%w: second hello", ErrHandshake)
				}
				mu.Unlock()
			}
		case typ == msgJoin:
			select {
			case <-established:
				mu.Lock()
				s := session
				mu.Unlock()
				a.index, a.err = serverJoin(conn, s)
			case <-ctx.Done():
				a.err = ctx.Err()
			}
		default:
			a.err = fmt.Errorf("%w: unexpected message %d", ErrHandshake, typ)
		}
		stop()
		if a.err != nil {
			conn.Close()
		}
		select {
		case results <- a:
		case <-ctx.Done():
			if a.err == nil {
				conn.Close()
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				select {
				case results <- accepted{err: fmt.Errorf("accepting: %w", err), index: -1}:
				case <-ctx.Done():
				}
				return
			}
			wg.Add(1)
			go handle(conn)
		}
	}()

	var (
		conns   []net.Conn
		lastErr error
		want    = -1
		hs      *confirmed
	)
	fail := func(err error) ([]net.Conn, *confirmed, error) {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		cancel()
		return nil, nil, err
	}
	for {
		select {
		case <-ctx.Done():
			return fail(errors.Join(ctx.Err(), lastErr))
		case a := <-results:
			if a.index == -1 {
				return fail(errors.Join(a.err, lastErr))
			}
			if a.err != nil {
				d.log.Warn("Rejected a data-plane connection", "error", a.err)
				lastErr = a.err
				continue
			}
			if a.session != nil {
				want, hs = a.session.params.streams, a.session
				grown := make([]net.Conn, want)
				copy(grown, conns)
				conns = grown
			}
			if a.index >= len(conns) {
				grown := make([]net.Conn, a.index+1)
				copy(grown, conns)
				conns = grown
			}
			if conns[a.index] != nil {
				a.conn.Close()
				d.log.Warn("Rejected a duplicate stream", "stream", a.index)
				continue
			}
			conns[a.index] = a.conn
			if want > 0 && len(conns) == want && !slices.Contains(conns, nil) {
				return conns, hs, nil
			}
		}
	}
}

func (d *Destination) receive(ctx context.Context, ln net.Listener, keys Keys) (DestinationResult, error) {
	var res DestinationResult
	conns, hs, err := d.accept(ctx, ln, keys)
	if err != nil {
		return res, fmt.Errorf("accepting streams: %w", err)
	}
	res.Streams = len(conns)
	sess, err := newSession(ctx, sessionConfig{
		role: roleDestination, secret: hs.secret, transcript: hs.transcript,
		conns: conns, region: d.cfg.Region, zeroPages: d.cfg.ZeroPageElision, local: d.cfg.Stream, lanes: hs.lanes(d.cfg.Lanes), log: d.log,
	})
	hs.destroy() // every key the session needs is derived
	if err != nil {
		for _, c := range conns {
			c.Close()
		}
		return res, err
	}
	defer sess.close()
	d.log.Info("Migration transport established", "streams", len(conns))
	// pumped is closed when the destination's direction of the byte stream has ended.
	pumped := sess.pumpLanes()
	fins := make([]finRecord, 0, len(conns))
	for len(fins) < len(conns) {
		select {
		case f := <-sess.fins:
			fins = append(fins, f)
		case <-sess.ctx.Done():
			return res, sess.err()
		}
	}
	// A byte stream is complete when both directions have ended: the local end (the
	// destination hypervisor, or the agent speaking for it) has said all it had to say
	// before anything is acknowledged.
	select {
	case <-pumped:
	case <-sess.ctx.Done():
		return res, sess.err()
	}
	if err := d.complete(sess); err != nil {
		sess.fail(err, true)
		return res, err
	}
	digest, err := d.checkDigest(sess, fins)
	if err != nil {
		sess.fail(err, true)
		return res, err
	}
	res.MemoryDigest = digest
	slices.SortFunc(fins, func(a, b finRecord) int { return a.stream - b.stream })
	t := sess.commitTranscript(fins)
	var commitMAC []byte
	if err := keys.TK.use(func(key []byte) error {
		var err error
		commitMAC, err = grant.CommitMAC(key, d.cfg.MigrationID, t)
		return err
	}); err != nil {
		sess.fail(err, true)
		return res, fmt.Errorf("acknowledging the commit: %w", err)
	}
	res.Commit = Commit{MigrationID: d.cfg.MigrationID, Transcript: t, MAC: commitMAC}
	done := make(chan struct{})
	ack := append(append([]byte(nil), t...), res.Commit.MAC...)
	if err := sess.submit(0, sendJob{typ: frameAck, data: ack, done: done}); err != nil {
		return res, err
	}
	if err := sess.wait(done); err != nil {
		return res, fmt.Errorf("sending the commit acknowledgement: %w", err)
	}
	// The acknowledgement is out: from here on the migration is committed. Let the source
	// close first so that nothing it has not read is reset.
	drain := time.NewTimer(d.cfg.DrainTimeout)
	defer drain.Stop()
	for _, st := range sess.streams {
		select {
		case <-st.ended:
		case <-sess.ctx.Done():
		case <-drain.C:
		}
	}
	return res, nil
}

// checkDigest computes the memory root of the received region and compares it with the
// memory digest of every FIN. It returns the root, nil without a region. Every chunk was
// hashed by its stream's opener after the last page written to it (the FINs are in, so every
// opener is done with pages), and nothing else writes the region: only the root is left.
func (d *Destination) checkDigest(sess *session, fins []finRecord) ([]byte, error) {
	if d.cfg.Region == nil {
		return nil, nil
	}
	if d.cfg.rehashReceived {
		sess.digests.hashAll()
	}
	got := sess.digests.root()
	for _, f := range fins {
		if !bytes.Equal(f.digest, got) {
			return nil, fmt.Errorf("%w: memory digest mismatch: source sent %x on stream %d, destination received %x", ErrIncomplete, f.digest, f.stream, got)
		}
	}
	return got, nil
}

// complete is the destination's completeness check at FIN.
func (d *Destination) complete(sess *session) error {
	if r := d.cfg.Region; r != nil {
		full := r.fullSet()
		for i, w := range full {
			if sess.received[i] != w {
				return fmt.Errorf("%w: pages missing near page %d", ErrIncomplete, i*64)
			}
		}
	}
	if !sess.peerClosedEach() {
		return fmt.Errorf("%w: byte stream not closed", ErrIncomplete)
	}
	return nil
}
