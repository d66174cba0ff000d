package dataplane

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// Pauser stops and restarts a guest: the source pauses it before the final round.
// Pause must not return until no write to guest memory is in progress.
type Pauser interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
}

// Throttler is what a Guest implements to be slowed down while pre-copy does not converge
// (SourceConfig.AutoConverge).
type Throttler interface {
	// Throttle slows the guest to (100 - percent)% of its speed: percent is from 0 (no
	// throttle, full speed) to 99.
	Throttle(ctx context.Context, percent int) error
}

// Auto-converge steps the throttle as QEMU's auto-converge does by default.
const (
	// throttleInitial is the throttle after the first round that did not converge.
	throttleInitial = 20
	// throttleIncrement is added after each further round that did not converge.
	throttleIncrement = 10
	// throttleMax is the most the guest is throttled.
	throttleMax = 99
)

// Progress is reported after each pre-copy round and after the final round.
type Progress struct {
	// Round counts from 0 (the round that sends every page).
	Round int
	// Final says this was the round after the guest was paused.
	Final bool
	// Pages and Bytes are what this round sent (Bytes counts page payloads only).
	Pages int
	Bytes int64
	// TotalPages and TotalBytes are what all rounds so far sent.
	TotalPages int64
	TotalBytes int64
	// Dirty is the number of pages written during the round, to be sent next.
	Dirty int
	// DirtyRate is pages written per second during the round.
	DirtyRate float64
	// Rate is bytes sent per second during the round.
	Rate float64
	// ETA estimates the time until the dirty set is small enough to pause; 0 when it already
	// is, negative when the guest dirties pages faster than they are sent.
	ETA time.Duration
	// Elapsed is the time since the transfer started.
	Elapsed time.Duration
	// Throttle is the percentage by which auto-converge slowed the guest during the round (for
	// the final round, until the pause); 0 for none.
	Throttle int
	// InRound marks a report made while the round is still sending (every
	// SourceConfig.ProgressInterval): Pages, Bytes and Rate are the round's so far, the totals
	// include them, Dirty and DirtyRate are not known yet, and ETA is the time to send the
	// rest of the round at Rate.
	InRound bool
}

// SourceConfig configures the source side of one migration.
type SourceConfig struct {
	// MigrationID names the migration; it salts every key and is checked by the peer.
	// Required, at most 255 bytes.
	MigrationID string
	// Peer is the destination agent's data endpoint, host:port. Required.
	Peer string
	// Dial opens a connection to Peer. Nil means a net.Dialer over TCP.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Streams is the number of parallel TCP connections. Zero means 1; at most 64.
	Streams int
	// Region is the guest memory to move. Nil means no memory transfer (byte stream only).
	Region *Region
	// Guest is paused before the final round and resumed if the migration fails before its
	// FIN is sent. Nil means nothing writes Region during the transfer.
	Guest Pauser
	// Stream is an opaque full-duplex byte stream to carry (the hypervisor's migration
	// stream). Its end of input is passed on as a half-close, and the peer's half-close is
	// passed back through CloseWrite if Stream has it; the transfer ends when both
	// directions are closed. Run closes Stream only if the migration fails. Nil means none.
	Stream io.ReadWriteCloser
	// Lanes, with Stream and more than one stream, gives the byte stream that stream i
	// (from 1) carries beside Stream on stream 0, under the same rules: the hypervisor's
	// multifd channels. The destination must allow lanes. Nil means only Stream.
	Lanes func(i int) io.ReadWriteCloser
	// MaxRounds bounds the pre-copy rounds before the final one. Zero means 30.
	MaxRounds int
	// ConvergedPages is the dirty-set size at or below which pre-copy stops and the guest is
	// paused, without MaxDowntime. Zero means 256 pages (1 MiB).
	ConvergedPages int
	// MaxDowntime is the longest the final round may keep the guest paused. Pre-copy then
	// goes on until the dirty set would be sent within it at the throughput the rounds have
	// measured (instead of ConvergedPages), and if after MaxRounds it still
	// would not, Run fails with ErrNotConverging without pausing the guest. Zero means no
	// limit: a guest that does not converge is paused after MaxRounds all the same.
	MaxDowntime time.Duration
	// ZeroPageElision sends all-zero pages as a flag instead of sealed zeroes. It reveals
	// which pages are zero: set it only where the tenant's policy allows it
	// (transport.zeroPageElision). The destination must allow it too.
	ZeroPageElision bool
	// RehashPausedMemory hashes the whole region again while the guest is paused, instead of
	// keeping each page's digest from when it was last sent. The memory digest then also
	// catches a writer that bypasses dirty tracking (writes a page without MarkDirty, or
	// after Pause returned), at the cost of a full pass over memory in the pause. False
	// trusts the Region contract and hashes in the pause only the pages of the final round.
	RehashPausedMemory bool
	// AutoConverge throttles Guest, if it is a Throttler, while pre-copy does not converge: after
	// each round whose dirty set is larger than the converged size and more than half the pages
	// the round sent, the throttle starts at 20% or rises by 10 points, up to 99%. It is
	// lifted when Run returns, before a paused guest is resumed. A guest that still does not
	// converge at 99% is paused after MaxRounds all the same, or not at all under
	// MaxDowntime. False never throttles.
	AutoConverge bool
	// Progress, if not nil, is called from Run's goroutine after every round, and every
	// ProgressInterval while a round is sending (Progress.InRound).
	Progress func(Progress)
	// ProgressInterval is the time between reports within a round. Zero means 1 s; negative,
	// reports after rounds only.
	ProgressInterval time.Duration
	// Spool holds what was kept of the guest outside Region; it is scrubbed after commit.
	// Nil means none.
	Spool *Spool
	// HandshakeTimeout bounds connecting and key confirmation. Zero means 10 s.
	HandshakeTimeout time.Duration
	// Logger receives debug and info records. Nil means none.
	Logger *slog.Logger
}

// SourceResult is what a committed migration leaves the source with.
type SourceResult struct {
	// Commit is the destination's verified commit acknowledgement.
	Commit Commit
	// Erasure states what the source zeroized and scrubbed after commit.
	Erasure attest.ErasureStatement
	// Rounds is one entry per round, the final one included. Nil without a region.
	Rounds []RoundStats
	// PagesSent and BytesSent count page payloads over all rounds.
	PagesSent int64
	BytesSent int64
	// Downtime is how long the guest was paused before the commit: from the call to
	// Guest.Pause (or, without a Guest, the start of the final round) to the verified commit
	// acknowledgement, after which the destination may resume the guest.
	Downtime time.Duration
	// MemoryDigest is the memory root (see MemoryRoot) of the guest's memory as sent: each
	// page's SHA-256 is of the page as last sent, the pages of the final round hashed while
	// the guest was paused (all of them with RehashPausedMemory). It is carried in every FIN and checked by the destination against
	// the root of what it received before it acknowledged. Nil without a region.
	MemoryDigest []byte
}

// RoundStats is what one pre-copy round, or the final round, sent.
type RoundStats struct {
	// Round counts from 0 (the round that sends every page).
	Round int
	// Final says this was the round after the guest was paused.
	Final bool
	// Pages and Bytes are what the round sent (Bytes counts page payloads only).
	Pages int
	Bytes int64
	// Dirty is the number of pages written during the round, to be sent next; 0 for the
	// final round.
	Dirty int
	// DirtyRate is pages written per second during the round.
	DirtyRate float64
	// Duration is the time the round took to send.
	Duration time.Duration
	// Throttle is the percentage by which auto-converge slowed the guest during the round;
	// 0 for none.
	Throttle int
}

// Source runs the source side of one migration. It is single use.
type Source struct {
	cfg  SourceConfig
	log  *slog.Logger
	used atomic.Bool
	// throttler is Guest if auto-converge may throttle it, else nil; throttle is its current
	// throttle. Only Run's goroutine uses them.
	throttler Throttler
	throttle  int
	// converged is the dirty-set size at or below which pre-copy stops: ConvergedPages, or
	// under MaxDowntime what the measured throughput sends within it. The throughput is
	// sentBytes (page payloads sealed, not zero-page flags) over sendTime, over all rounds
	// so far: the first, which sends all of memory, weighs most, and the little a short
	// round leaves in socket buffers when it ends cannot inflate it much. Only Run's
	// goroutine uses them.
	converged           int
	sentBytes, sendTime float64
}

// NewSource checks cfg and fills in defaults.
func NewSource(cfg SourceConfig) (*Source, error) {
	if cfg.MigrationID == "" || len(cfg.MigrationID) > maxIDLen {
		return nil, fmt.Errorf("creating source: migration id must have 1 to %d bytes", maxIDLen)
	}
	if cfg.Peer == "" {
		return nil, errors.New("creating source: no peer")
	}
	if cfg.Region == nil && cfg.Stream == nil {
		return nil, errors.New("creating source: nothing to transfer (no region, no stream)")
	}
	if cfg.Streams < 0 || cfg.Streams > maxStreams {
		return nil, fmt.Errorf("creating source: %d streams, want 1 to %d", cfg.Streams, maxStreams)
	}
	if cfg.Streams == 0 {
		cfg.Streams = 1
	}
	if cfg.MaxRounds <= 0 {
		cfg.MaxRounds = 30
	}
	if cfg.ConvergedPages <= 0 {
		cfg.ConvergedPages = 256
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Source{cfg: cfg, log: log.With("component", "migagent", "role", "source", "migration", cfg.MigrationID)}
	if cfg.AutoConverge {
		s.throttler, _ = cfg.Guest.(Throttler)
	}
	return s, nil
}

func (s *Source) params() handshakeParams {
	c := &s.cfg
	return newHandshakeParams(c.MigrationID, c.Streams, c.Region, c.ZeroPageElision, c.Stream, c.Lanes != nil && c.Streams > 1)
}

// connect dials every stream, runs key confirmation on the first and joins the others. The
// caller destroys the session it returns.
func (s *Source) connect(ctx context.Context, keys Keys) (conns []net.Conn, session *confirmed, err error) {
	defer func() {
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			session.destroy()
			conns, session = nil, nil
		}
	}()
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	for i := range s.cfg.Streams {
		conn, err := s.cfg.Dial(hctx, "tcp", s.cfg.Peer)
		if err != nil {
			return conns, session, fmt.Errorf("dialing stream %d: %w", i, err)
		}
		conns = append(conns, conn)
		stop := withDeadline(hctx, conn, s.cfg.HandshakeTimeout)
		if i == 0 {
			session, err = clientHandshake(conn, s.params(), keys)
		} else {
			err = join(conn, session, i)
		}
		stop()
		if err != nil {
			return conns, session, fmt.Errorf("confirming keys: %w", err)
		}
	}
	return conns, session, nil
}

// Run migrates: it connects to the peer and confirms keys (TK, and that each end holds the
// HPKE key the other's grant names: keys.Identity here, keys.PeerKey there), runs pre-copy rounds, pauses the guest, sends
// the final round, completes the memory root of what it sent (hashing, while the guest is
// paused, only the pages of the final round), sends the FINs carrying that digest,
// waits for the commit acknowledgement and verifies it under keys.TK, then zeroizes keys.TK
// and keys.MDK and scrubs the region and spool.
//
// Run destroys keys.TK whatever happens, keys.MDK only on commit, and never keys.Identity.
// It returns an error, having sent nothing, if keys.Identity is missing or zeroized or
// keys.PeerKey is missing or malformed. If the migration fails before the FIN was sent, Run
// resumes the guest it paused; a throttle auto-converge set is lifted first, whatever the
// outcome. After the FIN was sent, the outcome is unknown and the guest stays paused
// (the error wraps ErrCommitUnknown). Errors wrap ErrKeyConfirmation, ErrHandshake,
// ErrPeerAborted, ErrCommitAck, ErrUsed, or are *FrameError or the transport's.
func (s *Source) Run(ctx context.Context, keys Keys) (SourceResult, error) {
	defer keys.TK.Destroy()
	if !s.used.CompareAndSwap(false, true) {
		return SourceResult{}, fmt.Errorf("running source: %w", ErrUsed)
	}
	if keys.TK == nil {
		return SourceResult{}, errors.New("running source: no TK")
	}
	if err := checkHandshakeKeys(keys.Identity, keys.PeerKey); err != nil {
		return SourceResult{}, fmt.Errorf("running source: %w", err)
	}
	conns, hs, err := s.connect(ctx, keys)
	if err != nil {
		return SourceResult{}, err
	}
	sess, err := newSession(ctx, sessionConfig{
		role: roleSource, secret: hs.secret, transcript: hs.transcript,
		conns: conns, region: s.cfg.Region, zeroPages: s.cfg.ZeroPageElision, local: s.cfg.Stream, lanes: hs.lanes(s.cfg.Lanes), log: s.log,
	})
	hs.destroy() // every key the session needs is derived
	if err != nil {
		for _, c := range conns {
			c.Close()
		}
		return SourceResult{}, err
	}
	s.log.Info("Migration transport established", "streams", len(conns))

	res, paused, finSent, err := s.transfer(ctx, sess, keys.TK)
	sess.close()
	s.setThrottle(context.WithoutCancel(ctx), 0)
	if err != nil {
		if finSent {
			return SourceResult{}, fmt.Errorf("%w: %w", ErrCommitUnknown, err)
		}
		if paused {
			if rerr := s.cfg.Guest.Resume(context.WithoutCancel(ctx)); rerr != nil {
				err = errors.Join(err, fmt.Errorf("resuming guest: %w", rerr))
			}
		}
		return SourceResult{}, err
	}
	res.Erasure, err = erase(s.cfg.MigrationID, keys, s.cfg.Region, s.cfg.Spool)
	s.log.Info("Migration committed, source erased", "rounds", len(res.Rounds), "bytes", res.BytesSent, "downtime", res.Downtime)
	return res, err
}

// transfer runs the rounds, sends the FINs and verifies the commit acknowledgement under tk.
func (s *Source) transfer(ctx context.Context, sess *session, tk *SecretKey) (res SourceResult, paused, finSent bool, err error) {
	pumped := sess.pumpLanes()
	start := time.Now()
	var pausedAt time.Time
	if r := s.cfg.Region; r != nil {
		r.clearDirty() // everything goes in round 0
		set := r.fullSet()
		pages := r.Pages()
		s.converged = s.cfg.ConvergedPages
		var zeroBefore int64 // pages sent as zero-page flags before this round
		for round := 0; ; round++ {
			final := round > 0 && (pages <= s.converged || round >= s.cfg.MaxRounds)
			if final && pages > s.converged {
				if s.cfg.MaxDowntime > 0 {
					err := s.notConverging(round, pages)
					sess.fail(err, true)
					return res, false, false, err
				}
				s.log.Warn("Pre-copy did not converge, pausing the guest all the same",
					"rounds", round, "dirty", pages, "converged_pages", s.converged, "throttle", s.throttle)
			}
			if final {
				pausedAt = time.Now()
				if s.cfg.Guest != nil {
					if err := s.cfg.Guest.Pause(ctx); err != nil {
						return res, paused, false, fmt.Errorf("pausing guest: %w", err)
					}
					paused = true
				}
				pages = r.orDirty(set)
			}
			t0 := time.Now()
			base := Progress{Round: round, Final: final, TotalPages: res.PagesSent, TotalBytes: res.BytesSent}
			if err := s.sendRound(sess, set, pages, base, start); err != nil {
				return res, paused, false, fmt.Errorf("sending round %d: %w", round, err)
			}
			d := time.Since(t0)
			res.PagesSent += int64(pages)
			res.BytesSent += int64(pages) * PageSize
			p := Progress{
				Round: round, Final: final, Pages: pages, Bytes: int64(pages) * PageSize,
				TotalPages: res.PagesSent, TotalBytes: res.BytesSent, Elapsed: time.Since(start),
				Throttle: s.throttle,
			}
			if !final {
				clear(set)
				pages = r.orDirty(set)
				p.Dirty = pages
			}
			if secs := d.Seconds(); secs > 0 {
				p.Rate = float64(p.Bytes) / secs
				p.DirtyRate = float64(p.Dirty) / secs
			}
			zero := sess.zeroSent.Load()
			s.measured(int64(pages-int(zero-zeroBefore))*PageSize, d)
			zeroBefore = zero
			res.Rounds = append(res.Rounds, RoundStats{
				Round: round, Final: final, Pages: p.Pages, Bytes: p.Bytes, Dirty: p.Dirty, DirtyRate: p.DirtyRate, Duration: d,
				Throttle: p.Throttle,
			})
			switch net := p.Rate - p.DirtyRate*PageSize; {
			case p.Dirty <= s.converged:
			case net > 0:
				p.ETA = time.Duration(float64(p.Dirty-s.converged) * PageSize / net * float64(time.Second))
			default:
				p.ETA = -1
			}
			s.log.Debug("Pre-copy round sent", "round", round, "pages", p.Pages, "dirty", p.Dirty, "throttle", p.Throttle)
			if s.cfg.Progress != nil {
				s.cfg.Progress(p)
			}
			if final {
				break
			}
			s.setThrottle(ctx, s.nextThrottle(p.Pages, p.Dirty))
		}
	}
	select {
	case <-pumped:
	case <-sess.ctx.Done():
		return res, paused, false, sess.err()
	}
	if err := sess.peerClosedAll(); err != nil {
		return res, paused, false, err
	}
	// The guest is paused (or nothing writes the region): every page's digest is of the page
	// as last sent, which is the paused memory under the Region contract.
	var digest []byte
	if s.cfg.Region != nil {
		if s.cfg.RehashPausedMemory {
			sess.digests.hashAll()
		}
		digest = sess.digests.root()
		res.MemoryDigest = digest
	}
	finSent = true
	if err := sess.sendFins(digest); err != nil {
		return res, paused, finSent, fmt.Errorf("sending FIN: %w", err)
	}
	var ack []byte
	select {
	case ack = <-sess.acks:
	case <-sess.ctx.Done():
		return res, paused, finSent, fmt.Errorf("waiting for the commit acknowledgement: %w", sess.err())
	}
	fins := make([]finRecord, len(sess.streams))
	for i, st := range sess.streams {
		fins[i] = finRecord{stream: i, hash: st.finHash}
	}
	commit := Commit{MigrationID: s.cfg.MigrationID, Transcript: sess.commitTranscript(fins)}
	if err := checkAck(&commit, ack, tk); err != nil {
		sess.fail(err, true)
		<-sess.ctx.Done()
		return res, paused, finSent, fmt.Errorf("checking the commit acknowledgement: %w", err)
	}
	res.Commit = commit
	if !pausedAt.IsZero() {
		res.Downtime = time.Since(pausedAt)
	}
	return res, paused, finSent, nil
}

// measured takes what a round sealed as page payloads and how long it took: under
// MaxDowntime the dirty set that converges is what the throughput so far sends within the
// limit.
func (s *Source) measured(bytes int64, d time.Duration) {
	if s.cfg.MaxDowntime <= 0 || d <= 0 {
		return
	}
	s.sentBytes += float64(bytes)
	s.sendTime += d.Seconds()
	if r := s.rate(); r > 0 {
		s.converged = max(1, int(r*s.cfg.MaxDowntime.Seconds()/PageSize))
	}
}

// rate is the measured throughput in bytes per second, 0 before any.
func (s *Source) rate() float64 {
	if s.sendTime <= 0 {
		return 0
	}
	return s.sentBytes / s.sendTime
}

// notConverging is the error of a pre-copy that after round rounds still leaves pages
// dirty, more than MaxDowntime allows.
func (s *Source) notConverging(round, pages int) error {
	pause := "an unknown pause"
	if r := s.rate(); r > 0 {
		d := time.Duration(float64(pages) * PageSize / r * float64(time.Second))
		pause = fmt.Sprintf("a pause of about %v at %.0f MB/s", d.Round(max(d/100, time.Microsecond)), r/1e6)
	}
	return fmt.Errorf("%w: after %d rounds (throttle %d%%) %d pages are still dirty, %s, over the %v limit; the guest was not paused",
		ErrNotConverging, round, s.throttle, pages, pause, s.cfg.MaxDowntime)
}

// nextThrottle is the throttle for the round after one that sent sent pages and left dirty
// pages to send. Pre-copy converges while the dirty set fits the converged size or is at most
// half of what the round sent (QEMU's trigger); otherwise the throttle starts or steps up.
func (s *Source) nextThrottle(sent, dirty int) int {
	switch {
	case s.throttler == nil || dirty <= s.converged || 2*dirty <= sent:
		return s.throttle
	case s.throttle == 0:
		return throttleInitial
	}
	return min(s.throttle+throttleIncrement, throttleMax)
}

// setThrottle throttles the guest by percent if it is not already. A guest that refuses is
// logged and left as it was: the migration goes on, and may pause the guest after MaxRounds.
func (s *Source) setThrottle(ctx context.Context, percent int) {
	if s.throttler == nil || percent == s.throttle {
		return
	}
	if err := s.throttler.Throttle(ctx, percent); err != nil {
		s.log.Warn("Throttling the guest failed", "throttle", percent, "error", err)
		return
	}
	if percent == 0 {
		s.log.Info("Guest throttle lifted", "throttle", s.throttle)
	} else {
		s.log.Info("Guest throttled for pre-copy to converge", "throttle", percent)
	}
	s.throttle = percent
}

// sendRound sends the pages of set (n of them) and, every ProgressInterval until they are
// handed to the streams, reports the round's progress so far from Run's goroutine, so that a
// long round (the first one sends all of memory) is not silent. base holds the round's number
// and the totals before it; start is when the transfer started.
func (s *Source) sendRound(sess *session, set []uint64, n int, base Progress, start time.Time) error {
	if s.cfg.Progress == nil || s.cfg.ProgressInterval < 0 {
		return sess.sendPageSet(set)
	}
	done := make(chan error, 1)
	from := sess.queued.Load()
	t0 := time.Now()
	go func() { done <- sess.sendPageSet(set) }()
	t := time.NewTicker(cmp.Or(s.cfg.ProgressInterval, time.Second))
	defer t.Stop()
	for {
		select {
		case err := <-done:
			return err
		case <-t.C:
		}
		sent := int(sess.queued.Load() - from)
		p := base
		p.InRound, p.Pages, p.Bytes = true, sent, int64(sent)*PageSize
		p.TotalPages += int64(sent)
		p.TotalBytes += p.Bytes
		p.Elapsed = time.Since(start)
		if secs := time.Since(t0).Seconds(); secs > 0 {
			p.Rate = float64(p.Bytes) / secs
		}
		if p.Rate > 0 && n > sent {
			p.ETA = time.Duration(float64(n-sent) * PageSize / p.Rate * float64(time.Second))
		}
		s.cfg.Progress(p)
	}
}

// checkAck checks that ack, the payload of the destination's ACK frame (transcript ‖ MAC),
// acknowledges the transcript of commit and that its MAC verifies under tk, and sets
// commit.MAC. Errors wrap ErrCommitAck, or ErrKeyDestroyed.
func checkAck(commit *Commit, ack []byte, tk *SecretKey) error {
	n := len(commit.Transcript)
	if len(ack) != n+sha256.Size {
		return fmt.Errorf("%w: %d bytes, want %d", ErrCommitAck, len(ack), n+sha256.Size)
	}
	if !bytes.Equal(ack[:n], commit.Transcript) {
		return fmt.Errorf("%w: it acknowledges another transcript", ErrCommitAck)
	}
	commit.MAC = ack[n:]
	return tk.use(func(key []byte) error { return commit.Verify(key, commit.MigrationID) })
}

// erase zeroizes the keys and scrubs the region and spool. The statement says what was done
// even when an error is returned.
func erase(migrationID string, keys Keys, region *Region, spool *Spool) (attest.ErasureStatement, error) {
	st := attest.ErasureStatement{Type: attest.StatementErasure, MigrationID: migrationID, KeysZeroized: []string{}}
	for _, k := range []struct {
		name string
		key  *SecretKey
	}{{attest.KeyTransfer, keys.TK}, {attest.KeyMemoryData, keys.MDK}} {
		if k.key == nil {
			continue
		}
		k.key.Destroy()
		st.KeysZeroized = append(st.KeysZeroized, k.name)
	}
	var errs []error
	if region != nil {
		n, err := region.Scrub()
		if err != nil {
			errs = append(errs, fmt.Errorf("scrubbing region: %w", err))
		} else {
			st.PagesScrubbed, st.PageBytesScrubbed = uint64(region.Pages()), uint64(n)
		}
	}
	if spool != nil {
		n, err := spool.Scrub()
		if err != nil {
			errs = append(errs, err)
		} else {
			st.SpoolBytesScrubbed = uint64(n)
		}
	}
	return st, errors.Join(errs...)
}
