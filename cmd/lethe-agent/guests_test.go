package main

import (
	"context"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
	"github.com/lethe-cc/lethe/migagent"
)

func TestCheckGuestSizes(t *testing.T) {
	const gib = 1 << 30
	tests := map[string]struct {
		guests  []string
		avail   uint64
		wantErr string
	}{
		"fits":               {guests: []string{"demo/a=1GiB", "demo/b=1GiB"}, avail: 3 * gib},
		"one too large":      {guests: []string{"demo/huge=1TiB"}, avail: 3 * gib, wantErr: "--guest demo/huge: 1.0 TiB does not fit in the 3.0 GiB of memory available on this host"},
		"together too large": {guests: []string{"demo/a=2GiB", "demo/b=2GiB"}, avail: 3 * gib, wantErr: "--guest demo/b: with the guests before it, 4.0 GiB does not fit in the 3.0 GiB"},
		"files take nothing": {guests: []string{"demo/f=file:/dev/null"}, avail: 0},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var specs []migagent.GuestSpec
			for _, g := range tc.guests {
				s, err := migagent.ParseGuestSpec(g)
				if err != nil {
					t.Fatal(err)
				}
				specs = append(specs, s)
			}
			err := checkGuestSizes(specs, tc.avail)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("checkGuestSizes = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("checkGuestSizes = %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

// TestRunRefusesHugeGuest checks that the agent refuses a guest larger than the host's memory
// at start, before allocating anything, and names it.
func TestRunRefusesHugeGuest(t *testing.T) {
	daemontest.ClearEnv(t)
	c, err := parseFlags([]string{"--dev", "--host", "host-a", "--guest", "demo/huge=1024TiB", "--log-format", "text"})
	if err != nil {
		t.Fatal(err)
	}
	err = run(t.Context(), c)
	if err == nil || !strings.Contains(err.Error(), "--guest demo/huge: 1.0 PiB does not fit in the") {
		t.Fatalf("run = %v, want the guest refused for its size", err)
	}
}

// TestCancellable checks that a cancelled context ends the wait for a slow constructor.
func TestCancellable(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	release := make(chan struct{})
	defer close(release)
	cancel()
	_, err := cancellable(ctx, func() (int, error) {
		<-release
		return 1, nil
	})
	if err == nil || !strings.Contains(err.Error(), "context canceled") {
		t.Fatalf("cancellable after cancel = %v, want context canceled", err)
	}
	v, err := cancellable(t.Context(), func() (int, error) { return 7, nil })
	if v != 7 || err != nil {
		t.Fatalf("cancellable = %d, %v; want 7, nil", v, err)
	}
}
