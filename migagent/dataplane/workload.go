package dataplane

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Pattern is how a synthetic workload picks the pages it writes.
type Pattern int

// The patterns of a synthetic workload.
const (
	// Sequential writes pages in order, wrapping at the end of the region.
	Sequential Pattern = iota
	// Uniform writes pages picked uniformly at random.
	Uniform
	// Hotspot writes nine times out of ten to the first tenth of the region, else anywhere.
	Hotspot
)

// String names the pattern.
func (p Pattern) String() string {
	switch p {
	case Sequential:
		return "sequential"
	case Uniform:
		return "uniform"
	case Hotspot:
		return "hotspot"
	}
	return fmt.Sprintf("pattern-%d", int(p))
}

// WorkloadConfig configures a synthetic guest workload.
type WorkloadConfig struct {
	// Region is the memory the workload writes. Required.
	Region *Region
	// Rate is how many page writes per second. Zero means 10000.
	Rate int
	// Pattern picks the pages. The zero value is Sequential.
	Pattern Pattern
	// Seed seeds the random patterns. Zero is a valid seed.
	Seed uint64
	// Tick is how often the workload writes a batch. Zero means as often as a batch holds a
	// page, between 1 ms and 100 ms: a slow workload need not wake a thousand times a second
	// (a host of a thousand idle guests spent most of its CPU in their timers).
	Tick time.Duration
}

// Workload is a synthetic guest for tests and benchmarks: it writes pages of a Region at a
// set rate and pattern and marks them dirty, until its context ends. It implements Pauser,
// and Throttler by writing at a fraction of its rate.
type Workload struct {
	cfg     WorkloadConfig
	mu      sync.Mutex
	paused  bool
	next    int
	rng     *rand.Rand
	counter uint64
	written atomic.Int64
	// throttle is the percentage by which the rate is lowered.
	throttle atomic.Int32
}

// NewWorkload checks cfg and fills in defaults.
func NewWorkload(cfg WorkloadConfig) (*Workload, error) {
	if cfg.Region == nil {
		return nil, fmt.Errorf("creating workload: no region")
	}
	if cfg.Rate < 0 || cfg.Tick < 0 {
		return nil, fmt.Errorf("creating workload: negative rate or tick")
	}
	if cfg.Rate == 0 {
		cfg.Rate = 10000
	}
	if cfg.Tick == 0 {
		cfg.Tick = min(max(time.Second/time.Duration(cfg.Rate), time.Millisecond), 100*time.Millisecond)
	}
	return &Workload{cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, 0x6c65746865))}, nil
}

// Run writes pages until ctx ends, then returns nil. A batch per tick keeps the rate; a tick
// that comes late does not make up for lost time, so the rate is an upper bound.
func (w *Workload) Run(ctx context.Context) error {
	t := time.NewTicker(w.cfg.Tick)
	defer t.Stop()
	perTick := float64(w.cfg.Rate) * w.cfg.Tick.Seconds()
	carry := 0.0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		carry += perTick * float64(100-w.throttle.Load()) / 100
		n := int(carry)
		carry -= float64(n)
		w.write(n)
	}
}

func (w *Workload) write(n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.paused {
		return
	}
	r := w.cfg.Region
	pages := r.Pages()
	for range n {
		var p int
		switch w.cfg.Pattern {
		case Uniform:
			p = w.rng.IntN(pages)
		case Hotspot:
			if hot := max(pages/10, 1); w.rng.IntN(10) != 0 {
				p = w.rng.IntN(hot)
			} else {
				p = w.rng.IntN(pages)
			}
		default:
			p = w.next
			w.next = (w.next + 1) % pages
		}
		w.counter++
		page := r.Page(p)
		off := int(w.counter%(PageSize/8)) * 8
		binary.LittleEndian.PutUint64(page[off:], w.counter)
		r.MarkDirty(p)
	}
	w.written.Add(int64(n))
}

// Pause stops writes; when it returns, no write is in progress and none starts until Resume.
func (w *Workload) Pause(context.Context) error {
	w.mu.Lock()
	w.paused = true
	w.mu.Unlock()
	return nil
}

// Resume lets writes go on.
func (w *Workload) Resume(context.Context) error {
	w.mu.Lock()
	w.paused = false
	w.mu.Unlock()
	return nil
}

// Throttle lowers the write rate by percent, from 0 (the configured rate) to 99.
func (w *Workload) Throttle(_ context.Context, percent int) error {
	if percent < 0 || percent > 99 {
		return fmt.Errorf("throttling workload: %d%%, want 0 to 99", percent)
	}
	w.throttle.Store(int32(percent))
	return nil
}

// Throttling returns the percentage by which the write rate is lowered.
func (w *Workload) Throttling() int { return int(w.throttle.Load()) }

// Written returns how many page writes the workload has made.
func (w *Workload) Written() int64 { return w.written.Load() }
