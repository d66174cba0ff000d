package main

import (
	"cmp"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/term"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// progressOut draws progress lines: on a terminal, one line redrawn in place and cut to the
// terminal's width (a line that wraps cannot be redrawn); elsewhere (a pipe, a log file), a
// plain line each time it changes enough, with no control characters.
type progressOut struct {
	w       io.Writer
	on, tty bool
	// width returns the terminal's columns; 0 when unknown.
	width func() int
	last  string
	drawn bool
}

func newProgressOut(w io.Writer, on bool) *progressOut {
	p := &progressOut{w: w, on: on, width: func() int { return 0 }}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		p.tty = true
		p.width = func() int {
			cols, _, err := term.GetSize(int(f.Fd()))
			if err != nil {
				return 0
			}
			return cols
		}
	}
	return p
}

// show draws line, cut to the terminal's width; outside a terminal, only when key (what is
// worth a new line) changed.
func (p *progressOut) show(key, line string) {
	p.draw(key, func(width int) string { return fitWidth(line, width) })
}

// draw draws the line render returns for the terminal's width (0: unlimited); outside a
// terminal, only when key (what is worth a new line) changed.
func (p *progressOut) draw(key string, render func(width int) string) {
	switch {
	case !p.on:
	case p.tty:
		// \r\033[K: back to the line's start and erase it; the line stays one column short of
		// the width, since a terminal wraps (or not) on writing its last column.
		fmt.Fprintf(p.w, "\r\033[K%s", render(max(0, p.width()-1)))
		p.drawn = true
	case key != p.last:
		fmt.Fprintln(p.w, render(0))
	}
	p.last = key
}

// end ends the line redrawn in place.
func (p *progressOut) end() {
	if p.drawn {
		fmt.Fprintln(p.w)
		p.drawn = false
	}
}

// progressKey is what changes a migration's progress enough for a new plain line: its phase,
// its pre-copy round, or a tenth more of its memory sent.
func progressKey(m *broker.Migration) string {
	p := m.Progress
	if p == nil {
		return string(m.Phase)
	}
	tenth := uint64(0)
	if total := totalBytes(m); total > 0 {
		tenth = min(10, p.Bytes*10/total)
	}
	return fmt.Sprintf("%s/%d/%d", m.Phase, p.Round, tenth)
}

func totalBytes(m *broker.Migration) uint64 {
	if m.Progress != nil && m.Progress.TotalBytes > 0 {
		return m.Progress.TotalBytes
	}
	return m.MemoryBytes
}

// progressView renders a migration's progress between the agent's reports, which come once
// per pre-copy round: the elapsed time and the time left move with the clock.
type progressView struct {
	now func() time.Time
	// report is the last progress report seen and seen when it was first seen.
	report agentapi.Progress
	seen   time.Time
}

// line renders m's progress in at most width columns (0: unlimited).
func (v *progressView) line(m *broker.Migration, width int) string {
	now := v.now()
	if p := m.Progress; p != nil && (v.seen.IsZero() || p.Time != v.report.Time || p.Round != v.report.Round || p.Bytes != v.report.Bytes) {
		v.report, v.seen = *p, now
	}
	left := time.Duration(-1)
	if p := m.Progress; p != nil && p.ETA > 0 {
		left = max(0, p.ETA-now.Sub(v.seen))
	}
	return fitLine(progressFields(m, now, left), width)
}

// progressLine renders m's phase and transfer progress as the broker last recorded it.
func progressLine(m *broker.Migration) string {
	left := time.Duration(-1)
	if m.Progress != nil && m.Progress.ETA > 0 {
		left = m.Progress.ETA
	}
	return fitLine(progressFields(m, time.Time{}, left), 0)
}

// lineFields are the parts of a progress line; fitLine drops the optional ones, by drop, to
// fit a width.
type lineFields struct {
	// frac is the fraction of memory sent, for the bar; negative for no bar.
	frac float64
	// head are always shown; opt are dropped from the last to fit.
	head, opt []string
}

// progressFields returns the parts of m's progress line at now (zero: no elapsed time),
// with left the time left to converge (negative: unknown).
func progressFields(m *broker.Migration, now time.Time, left time.Duration) lineFields {
	start := m.Created
	for _, e := range m.Timeline {
		if e.Phase == broker.PhaseTransferring {
			start = e.Entered
		}
	}
	elapsed := ""
	if !now.IsZero() && !m.Created.IsZero() {
		elapsed = "elapsed " + max(0, now.Sub(m.Created)).Truncate(time.Second).String()
	}
	p := m.Progress
	if p == nil || (m.Phase != broker.PhaseTransferring && m.Phase != broker.PhaseCuttingOver) {
		return lineFields{frac: -1, head: []string{string(m.Phase)}, opt: nonEmpty(elapsed)}
	}
	total := totalBytes(m)
	frac := 0.0
	if total > 0 {
		frac = min(1, float64(p.Bytes)/float64(total))
	}
	rate := p.Throughput
	if sent := now.Sub(start); rate == 0 && !now.IsZero() && sent > time.Second {
		rate = float64(p.Bytes) / sent.Seconds()
	}
	var eta string
	switch {
	case m.Phase == broker.PhaseCuttingOver:
		eta = "cutting over"
	case p.NotConverging:
		eta = "not converging"
	case left < 0:
		eta = "ETA --"
	case left < time.Second:
		eta = "ETA <1s"
	default:
		eta = "ETA " + left.Round(time.Second).String()
	}
	f := lineFields{frac: frac, head: []string{fmt.Sprintf("%3.0f%%", frac*100), eta}}
	throughput := ""
	if rate > 0 {
		throughput = bytesText(uint64(rate)) + "/s"
	}
	// The most telling first: a narrow terminal shows a prefix of these.
	f.opt = nonEmpty(bytesText(p.Bytes)+"/"+bytesText(total), fmt.Sprintf("round %d", max(1, p.Round)), throughput,
		elapsed, "dirty "+bytesText(uint64(p.DirtyRate))+"/s")
	return f
}

func nonEmpty(s ...string) []string {
	var out []string
	for _, v := range s {
		if v != "" {
			out = append(out, v)
		}
	}
	return out
}

// The bar's width: up to barMax, and no bar rather than one narrower than barMin.
const (
	barMin = 10
	barMax = 30
)

// fitLine joins f's parts in at most width columns (0: unlimited): it narrows the bar, drops
// the optional parts from the last, then the bar, and cuts what still does not fit.
func fitLine(f lineFields, width int) string {
	opt := f.opt
	for {
		text := strings.Join(append(append([]string{}, f.head...), opt...), "  ")
		if f.frac < 0 {
			if width == 0 || len(text) <= width || len(opt) == 0 {
				return fitWidth(text, width)
			}
			opt = opt[:len(opt)-1]
			continue
		}
		bar := barMax
		if width > 0 {
			bar = min(barMax, width-len(text)-3) // "[" "]" and a space
		}
		switch {
		case bar >= barMin:
			n := int(f.frac * float64(bar))
			return "[" + strings.Repeat("=", n) + strings.Repeat(" ", bar-n) + "] " + text
		case len(opt) > 0:
			opt = opt[:len(opt)-1]
		default:
			return fitWidth(text, width)
		}
	}
}

// fitWidth cuts s to width columns (0: unlimited), counting a rune as a column.
func fitWidth(s string, width int) string {
	if width > 0 && utf8.RuneCountInString(s) > width {
		return string([]rune(s)[:width])
	}
	return s
}

// printSummary writes how a finished migration went, as virsh domjobinfo --completed does:
// its outcome, elapsed time, data moved, rounds and downtime, and where its receipt is.
func printSummary(w io.Writer, m *broker.Migration) {
	outcome := cmp.Or(string(m.Outcome), string(m.Phase))
	if m.Phase == broker.PhaseAborted && m.AbortReason != "" {
		outcome += " (" + m.AbortReason + ")"
	}
	fmt.Fprintf(w, "Migration %s: %s\n", m.ID, outcome)
	where := fmt.Sprintf("%s/%s now runs on %s (moved from %s)", m.Tenant, m.VM, m.Destination, m.Source)
	if m.Phase != broker.PhaseErased {
		where = fmt.Sprintf("%s/%s runs on at %s", m.Tenant, m.VM, m.Source)
	}
	fmt.Fprintf(w, "  Guest:        %s\n", where)
	if !m.Finished.IsZero() {
		fmt.Fprintf(w, "  Time elapsed: %s\n", durationText(m.Finished.Sub(m.Created)))
	}
	var moved, pages uint64
	for _, r := range m.Rounds {
		moved, pages = moved+r.Bytes, pages+r.Pages
	}
	if moved == 0 && m.Progress != nil {
		moved, pages = m.Progress.Bytes, m.Progress.Pages
	}
	if moved > 0 {
		of := ""
		if total := totalBytes(m); total > 0 {
			of = " of a " + bytesText(total) + " guest"
		}
		fmt.Fprintf(w, "  Data moved:   %s (%d pages)%s\n", bytesText(moved), pages, of)
	}
	if len(m.Rounds) > 0 {
		fmt.Fprintf(w, "  Rounds:       %d\n", len(m.Rounds))
	}
	if m.Downtime > 0 {
		limit := ""
		if m.MaxDowntime > 0 {
			limit = ", limit " + durationText(m.MaxDowntime)
		}
		fmt.Fprintf(w, "  Downtime:     %s (measured by the %s%s)\n", durationText(m.Downtime), cmp.Or(m.DowntimeSource, "source"), limit)
	}
	fmt.Fprintf(w, "  Receipt:      lethectl receipt get %s\n", m.ID)
}
