package dataplane

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

func TestWorkloadRateAndPause(t *testing.T) {
	for _, p := range []Pattern{Sequential, Uniform, Hotspot} {
		t.Run(p.String(), func(t *testing.T) {
			r := testRegion(t, 1<<20)
			synctest.Test(t, func(t *testing.T) {
				w, err := NewWorkload(WorkloadConfig{Region: r, Rate: 5000, Pattern: p})
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan error)
				go func() { done <- w.Run(ctx) }()
				wait := func(d time.Duration) {
					timer := time.NewTimer(d)
					<-timer.C
					synctest.Wait()
				}
				wait(time.Second + time.Millisecond/2)
				if got := w.Written(); got != 5000 {
					t.Errorf("wrote %d pages in 1 s, want 5000", got)
				}
				set := make([]uint64, len(r.dirty))
				if n := r.orDirty(set); n == 0 || n > 5000 {
					t.Errorf("%d pages dirty", n)
				}
				w.Pause(ctx)
				wait(time.Second)
				if got := w.Written(); got != 5000 {
					t.Errorf("paused workload wrote: %d", got)
				}
				w.Resume(ctx)
				wait(time.Second)
				if got := w.Written(); got != 10000 {
					t.Errorf("resumed workload: %d, want 10000", got)
				}
				cancel()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			})
		})
	}
}

func TestWorkloadThrottle(t *testing.T) {
	r := testRegion(t, 1<<20)
	synctest.Test(t, func(t *testing.T) {
		w, err := NewWorkload(WorkloadConfig{Region: r, Rate: 5000})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- w.Run(ctx) }()
		wait := func(d time.Duration) {
			timer := time.NewTimer(d)
			<-timer.C
			synctest.Wait()
		}
		if err := w.Throttle(ctx, 80); err != nil {
			t.Fatal(err)
		}
		wait(time.Second + time.Millisecond/2)
		if got := w.Written(); got != 1000 {
			t.Errorf("throttled by 80%%: wrote %d pages in 1 s, want 1000", got)
		}
		if err := w.Throttle(ctx, 0); err != nil {
			t.Fatal(err)
		}
		wait(time.Second)
		if got := w.Written(); got != 6000 {
			t.Errorf("throttle lifted: wrote %d pages, want 6000", got)
		}
		for _, bad := range []int{-1, 100} {
			if err := w.Throttle(ctx, bad); err == nil {
				t.Errorf("Throttle(%d) accepted", bad)
			}
		}
		if got := w.Throttling(); got != 0 {
			t.Errorf("throttle after refused values: %d, want 0", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}
