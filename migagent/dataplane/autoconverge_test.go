package dataplane

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A guest that writes its whole memory every millisecond dirties it faster than any round
// can send it: without throttling, pre-copy never converges. On a loaded machine the
// workload's goroutine may miss every tick of a short round, so the guest also writes its
// whole memory, less the throttle, after each pre-copy round (from Progress, before the next
// round): without throttling, every round then leaves all of memory dirty.
const (
	convergeSize  = 8 << 20
	convergeRate  = 2_000_000
	convergePages = 256
)

// runConverging migrates a region under a workload that does not converge unless throttled,
// with auto-converge on or off, and returns the workload and the migration's outcome.
// tweak, if not nil, changes the source's configuration.
func runConverging(t *testing.T, autoConverge bool, tweak func(*SourceConfig)) (*Workload, *migration) {
	t.Helper()
	srcRegion, dstRegion := testRegion(t, convergeSize), testRegion(t, convergeSize)
	fillRegion(srcRegion, 1)
	w, err := NewWorkload(WorkloadConfig{Region: srcRegion, Rate: convergeRate, Pattern: Sequential})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { w.Run(ctx) })
	defer wg.Wait() // a resumed workload writes until stopped, and its region is closed after
	defer stop()
	ln := listen(t)
	cfg := SourceConfig{
		MigrationID: "converge", Peer: ln.Addr().String(), Region: srcRegion, Guest: w,
		MaxRounds: 25, ConvergedPages: convergePages, AutoConverge: autoConverge,
		Progress: func(p Progress) {
			if !p.Final {
				w.write(srcRegion.Pages() * (100 - w.Throttling()) / 100)
			}
		},
	}
	if tweak != nil {
		tweak(&cfg)
	}
	src, err := NewSource(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewDestination(DestinationConfig{MigrationID: "converge", Region: dstRegion})
	if err != nil {
		t.Fatal(err)
	}
	ids := newIdentities(t)
	m := &migration{src: src, dst: dst,
		srcKeys: ids.source(Keys{TK: testKey(t, 1), MDK: testKey(t, 5)}),
		dstKeys: ids.destination(Keys{TK: testKey(t, 1), MDK: testKey(t, 9)})}
	m.run(t, ln)
	return w, m
}

func maxThrottle(rounds []RoundStats) int {
	m := 0
	for _, r := range rounds {
		m = max(m, r.Throttle)
	}
	return m
}

// running says whether w is neither paused nor throttled.
func running(w *Workload) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.paused && w.Throttling() == 0
}

func TestAutoConverge(t *testing.T) {
	tests := map[string]struct {
		on       bool
		converge bool
	}{
		"on":  {on: true, converge: true},
		"off": {on: false, converge: false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			w, m := runConverging(t, tc.on, nil)
			res, err := m.srcRes, m.srcErr
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range res.Rounds {
				t.Logf("round %d: %d pages, %d dirty, throttle %d%% (final %v)", r.Round, r.Pages, r.Dirty, r.Throttle, r.Final)
			}
			// The source pauses the guest when the dirty set left by a pre-copy round fits
			// ConvergedPages; the final round sends that set and what the guest wrote until
			// the pause (a few pages at 99%). Otherwise it pauses after MaxRounds and the final
			// round sends all of memory.
			last, precopy := res.Rounds[len(res.Rounds)-1], res.Rounds[len(res.Rounds)-2]
			if converged := precopy.Dirty <= convergePages; converged != tc.converge {
				t.Errorf("pre-copy left %d dirty pages after %d rounds (converged at %d): converged %v, want %v",
					precopy.Dirty, precopy.Round+1, convergePages, converged, tc.converge)
			}
			if !tc.converge && last.Pages != convergeSize/PageSize {
				t.Errorf("final round without convergence sent %d pages, want all %d", last.Pages, convergeSize/PageSize)
			}
			if rose := maxThrottle(res.Rounds) > 0; rose != tc.on {
				t.Errorf("throttle rose to %d%%, want a rise %v", maxThrottle(res.Rounds), tc.on)
			}
			if prev := res.Rounds[0].Throttle; prev != 0 {
				t.Errorf("round 0 throttled by %d%%", prev)
			}
			for i, r := range res.Rounds[1:] {
				if prev := res.Rounds[i].Throttle; r.Throttle < prev || r.Throttle > throttleMax {
					t.Errorf("round %d throttled by %d%% after %d%%", r.Round, r.Throttle, prev)
				}
			}
			if w.Throttling() != 0 {
				t.Errorf("throttle of %d%% not lifted after commit", w.Throttling())
			}
		})
	}
}

// cuttingPauser pauses the workload it embeds (and throttles it, through the embedded
// Throttle), then cuts the source's connections: the final round fails after the pause.
type cuttingPauser struct {
	*Workload
	mu       sync.Mutex
	conns    []net.Conn
	throttle int // at the pause
}

func (p *cuttingPauser) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err == nil {
		p.mu.Lock()
		p.conns = append(p.conns, c)
		p.mu.Unlock()
	}
	return c, err
}

func (p *cuttingPauser) Pause(ctx context.Context) error {
	if err := p.Workload.Pause(ctx); err != nil {
		return err
	}
	p.throttle = p.Throttling()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	return nil
}

// TestAutoConvergeLiftedOnFailure fails a migration after the guest was throttled and paused:
// the guest is resumed, at its full rate.
func TestAutoConvergeLiftedOnFailure(t *testing.T) {
	var p cuttingPauser
	w, m := runConverging(t, true, func(c *SourceConfig) {
		p.Workload = c.Guest.(*Workload)
		c.Guest, c.Dial = &p, p.dial
	})
	res, err := m.srcRes, m.srcErr
	if err == nil || errors.Is(err, ErrCommitUnknown) {
		t.Fatalf("source: got %v, want a failure before the FIN", err)
	}
	if len(res.Rounds) != 0 {
		t.Errorf("failed migration returned %d rounds", len(res.Rounds))
	}
	if p.throttle == 0 {
		t.Error("guest not throttled when it was paused")
	}
	if !running(w) {
		t.Errorf("guest not resumed at full rate: throttle %d%%", w.Throttling())
	}
}

// TestDowntimeLimit: under MaxDowntime, pre-copy stops as soon as the dirty set would be
// sent within the limit at the measured throughput; a guest that cannot get there, even
// throttled to 99%, is not paused at all: the migration ends with ErrNotConverging, the
// destination is told, and the guest runs on at full rate.
func TestDowntimeLimit(t *testing.T) {
	t.Run("generous", func(t *testing.T) {
		// All of memory is sent within 10 s at any throughput this test sees, so the
		// dirty set after round 0 converges at once, unthrottled.
		_, m := runConverging(t, false, func(c *SourceConfig) { c.MaxDowntime = 10 * time.Second })
		if m.srcErr != nil || m.dstErr != nil {
			t.Fatalf("source: %v; destination: %v", m.srcErr, m.dstErr)
		}
		if got := len(m.srcRes.Rounds); got != 2 {
			t.Errorf("%d rounds, want round 0 and the final one", got)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		// Nothing is sent within a microsecond: even at 99% the guest dirties more.
		var p countingPauser
		w, m := runConverging(t, true, func(c *SourceConfig) {
			p.Workload = c.Guest.(*Workload)
			c.Guest, c.MaxDowntime, c.MaxRounds = &p, time.Microsecond, 12
		})
		if !errors.Is(m.srcErr, ErrNotConverging) || errors.Is(m.srcErr, ErrCommitUnknown) {
			t.Fatalf("source: got %v, want ErrNotConverging before any FIN", m.srcErr)
		}
		t.Log(m.srcErr)
		if !errors.Is(m.dstErr, ErrPeerAborted) {
			t.Errorf("destination: got %v, want ErrPeerAborted", m.dstErr)
		}
		if !running(w) {
			t.Errorf("guest paused or still throttled (%d%%) after the migration gave up", w.Throttling())
		}
		if n := p.pauses.Load(); n != 0 {
			t.Errorf("guest paused %d times, want never", n)
		}
	})
}

// countingPauser counts the pauses of the workload it embeds (and throttles).
type countingPauser struct {
	*Workload
	pauses atomic.Int32
}

func (p *countingPauser) Pause(ctx context.Context) error {
	p.pauses.Add(1)
	return p.Workload.Pause(ctx)
}

func TestNextThrottle(t *testing.T) {
	tests := map[string]struct {
		noThrottler bool
		throttle    int
		sent, dirty int
		want        int
	}{
		"fits the limit":                {sent: 1000, dirty: 256, want: 0},
		"shrinks by half":               {sent: 1000, dirty: 500, want: 0},
		"first round not converging":    {sent: 1000, dirty: 501, want: 20},
		"next round not converging":     {throttle: 20, sent: 1000, dirty: 900, want: 30},
		"steps to the max":              {throttle: 90, sent: 1000, dirty: 900, want: 99},
		"stays at the max":              {throttle: 99, sent: 1000, dirty: 900, want: 99},
		"converging keeps the throttle": {throttle: 50, sent: 1000, dirty: 100, want: 50},
		"no throttler":                  {noThrottler: true, sent: 1000, dirty: 1000, want: 0},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := &Source{converged: 256, throttle: tc.throttle}
			if !tc.noThrottler {
				s.throttler = &Workload{}
			}
			if got := s.nextThrottle(tc.sent, tc.dirty); got != tc.want {
				t.Errorf("nextThrottle(%d, %d) at %d%% = %d%%, want %d%%", tc.sent, tc.dirty, tc.throttle, got, tc.want)
			}
		})
	}
}
