package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// transferring is a migration 2 s into its transfer, a quarter of 2 GiB sent.
func transferring(t0 time.Time) *broker.Migration {
	return &broker.Migration{
		ID: "mig-A", Phase: broker.PhaseTransferring, Created: t0, MemoryBytes: 2 << 30,
		Timeline: []broker.PhaseEntry{{Phase: broker.PhaseRequested, Entered: t0}, {Phase: broker.PhaseTransferring, Entered: t0}},
		Progress: &agentapi.Progress{Phase: agentapi.TransferPrecopy, Bytes: 512 << 20, TotalBytes: 2 << 30, Round: 1,
			DirtyRate: 64 << 20, Throughput: 256 << 20, ETA: 6 * time.Second, Time: t0.Add(2 * time.Second)},
	}
}

// TestProgressViewFitsAndMovesBetweenReports: the line fits every width, says what it can in
// it, and its time left counts down between the agent's reports, which come once a round.
func TestProgressViewFitsAndMovesBetweenReports(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	now := t0.Add(2 * time.Second)
	v := &progressView{now: func() time.Time { return now }}
	m := transferring(t0)
	full := v.line(m, 0)
	for _, want := range []string{"25%", "512.0 MiB/2.0 GiB", "round 1", "256.0 MiB/s", "elapsed 2s", "dirty 64.0 MiB/s", "ETA 6s"} {
		if !strings.Contains(full, want) {
			t.Errorf("line %q lacks %q", full, want)
		}
	}
	now = now.Add(2500 * time.Millisecond)
	if got := v.line(m, 0); !strings.Contains(got, "ETA 4s") || !strings.Contains(got, "elapsed 4s") {
		t.Errorf("2.5 s after the report: %q, want ETA 4s and elapsed 4s", got)
	}
	for _, width := range []int{120, 79, 59, 40, 20, 8} {
		got := v.line(m, width)
		if n := utf8.RuneCountInString(got); n > width {
			t.Errorf("width %d: %d columns: %q", width, n, got)
		}
		if width >= 20 && !strings.Contains(got, "25%") {
			t.Errorf("width %d: %q lacks the percentage", width, got)
		}
	}
}

// TestProgressLineNeverSaysETA0: before the first estimate the time left is unknown, not 0 s.
func TestProgressLineNeverSaysETA0(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	m := transferring(t0)
	m.Progress = &agentapi.Progress{Phase: agentapi.TransferStarted, TotalBytes: 2 << 30}
	v := &progressView{now: func() time.Time { return t0 }}
	if got := v.line(m, 0); strings.Contains(got, "ETA 0") || !strings.Contains(got, "ETA --") {
		t.Errorf("at the start: %q, want ETA --", got)
	}
}

func TestProgressLineNotConverging(t *testing.T) {
	m := &broker.Migration{Phase: broker.PhaseTransferring, MemoryBytes: 1 << 30, Progress: &agentapi.Progress{
		Phase: agentapi.TransferPrecopy, Bytes: 1 << 29, TotalBytes: 1 << 30, Round: 7, DirtyRate: 1 << 27, NotConverging: true,
	}}
	if got := progressLine(m); !strings.Contains(got, "not converging") || strings.Contains(got, "ETA") {
		t.Errorf("progress line %q, want one saying not converging instead of an ETA", got)
	}
	m.Progress.NotConverging, m.Progress.ETA = false, 3*time.Second
	if got := progressLine(m); !strings.Contains(got, "ETA 3s") {
		t.Errorf("progress line %q, want ETA 3s", got)
	}
}

func TestPrintSummary(t *testing.T) {
	var b bytes.Buffer
	printSummary(&b, committedMigration())
	want := `Migration mig-A: erased
  Guest:        demo/web now runs on h2 (moved from h1)
  Time elapsed: 2.5s
  Data moved:   1.0 MiB (257 pages)
  Rounds:       2
  Downtime:     42ms (measured by the agent, limit 300ms)
  Receipt:      lethectl receipt get mig-A
`
	if got := b.String(); got != want {
		t.Errorf("summary:\n%s\nwant\n%s", got, want)
	}
}
