package main

import (
	"context"
	"fmt"

	"github.com/lethe-cc/lethe/migagent"
)

// checkGuestSizes returns an error naming the first --guest whose memory, with the guests
// before it, does not fit in avail bytes (the host's available memory): the agent would fill
// the host's memory with it until the kernel killed it. Guests mapped from a file (file:PATH)
// take no memory up front and are not counted.
func checkGuestSizes(specs []migagent.GuestSpec, avail uint64) error {
	var total uint64
	for _, s := range specs {
		if s.File != "" {
			continue
		}
		total += uint64(s.MemoryBytes)
		if total > avail {
			if total == uint64(s.MemoryBytes) {
				return fmt.Errorf("--guest %s/%s: %s does not fit in the %s of memory available on this host", s.Tenant, s.VM, formatBytes(total), formatBytes(avail))
			}
			return fmt.Errorf("--guest %s/%s: with the guests before it, %s does not fit in the %s of memory available on this host", s.Tenant, s.VM, formatBytes(total), formatBytes(avail))
		}
	}
	return nil
}

// formatBytes formats n bytes in the largest binary unit that keeps a number of at least 1.
func formatBytes(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}

// cancellable returns what f returns, or ctx's error as soon as ctx ends: making the agent
// allocates and writes its guests' memory, which takes a while for large guests, and SIGTERM
// must stop the agent meanwhile. f goes on in the background; the agent exits right after.
func cancellable[T any](ctx context.Context, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("making the agent's guests: %w", context.Cause(ctx))
	}
}
