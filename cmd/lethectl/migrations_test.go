package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// committedMigration is a finished migration as the broker records it.
func committedMigration() *broker.Migration {
	t0 := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	return &broker.Migration{
		ID: "mig-A", Tenant: "demo", VM: "web", Source: "h1", Destination: "h2", Platform: attest.PlatformSEVSNP, Epoch: 1,
		Phase: broker.PhaseErased, PhaseSince: at(2500), RequestedBy: "tenant:demo", Created: t0,
		Outcome: broker.OutcomeErased, Finished: at(2500),
		MaxDowntime: 300 * time.Millisecond, Downtime: 42 * time.Millisecond, DowntimeSource: agentapi.DowntimeAgent,
		Timeline: []broker.PhaseEntry{
			{Phase: broker.PhaseRequested, Entered: at(0), Duration: 5 * time.Millisecond},
			{Phase: broker.PhaseTransferring, Entered: at(5), Duration: 1800 * time.Millisecond},
			{Phase: broker.PhaseErased, Entered: at(2500)},
		},
		Rounds: []agentapi.RoundStats{
			{Round: 1, Pages: 256, Bytes: 1 << 20, DirtyRate: 4096, Throughput: 1 << 30, Duration: time.Millisecond},
			{Round: 2, Final: true, Pages: 1, Bytes: 4096, Throughput: 1 << 22, Duration: time.Millisecond},
		},
	}
}

func TestPrintMigrationShowsDowntimeTimelineRounds(t *testing.T) {
	var b bytes.Buffer
	printMigration(&b, committedMigration())
	want := `Migration:    mig-A
Guest:        demo/web (epoch 1, sev-snp)
From → to:    h1 → h2
Phase:        Erased (since 2026-12-05T10:00:02Z)
Requested by: tenant:demo at 2026-12-05T10:00:00Z
Outcome:      erased at 2026-12-05T10:00:02Z
Max downtime: 300ms
Downtime:     42ms (measured by the agent)
Timeline:
  PHASE         ENTERED                   DURATION
  Requested     2026-12-05T10:00:00Z      5ms
  Transferring  2026-12-05T10:00:00.005Z  1.8s
  Erased        2026-12-05T10:00:02.5Z    -
Rounds:
  ROUND      PAGES  BYTES    DIRTY/S  THROUGHPUT/S  DURATION
  1          256    1.0 MiB  4.0 KiB  1.0 GiB       1ms
  2 (final)  1      4.0 KiB  0 B      4.0 MiB       1ms
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("output (-want +got):\n%s", diff)
	}
}

func TestPrintMigrationShowsDeniedDestinations(t *testing.T) {
	m := committedMigration()
	m.Destination = "h4"
	m.Attempts = []broker.Attempt{
		{Destination: "h2", Reason: "destination snp.tcb.microcode 0x12 < source 0x14", At: m.Created, Dropped: true},
		{Destination: "h3", Reason: "region us not allowed", At: m.Created.Add(time.Second)},
	}
	m.Timeline, m.Rounds = nil, nil
	var b bytes.Buffer
	printMigration(&b, m)
	want := `Denied destinations:
  DESTINATION  DENIED AT             REASON
  h2           2026-12-05T10:00:00Z  destination snp.tcb.microcode 0x12 < source 0x14
  h3           2026-12-05T10:00:01Z  region us not allowed
`
	got := b.String()
	if i := strings.Index(got, "Denied destinations:"); i < 0 {
		t.Fatalf("output lacks the denied destinations:\n%s", got)
	} else if diff := cmp.Diff(want, got[i:]); diff != "" {
		t.Errorf("denied destinations (-want +got):\n%s", diff)
	}
}

func TestMigrationJSONCarriesDowntimeTimelineRounds(t *testing.T) {
	var b bytes.Buffer
	o := brokerOpts{output: "json"}
	if err := o.show(&b, committedMigration(), nil); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Downtime time.Duration         `json:"downtime"`
		Timeline []broker.PhaseEntry   `json:"timeline"`
		Rounds   []agentapi.RoundStats `json:"rounds"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	m := committedMigration()
	if diff := cmp.Diff([]any{m.Downtime, m.Timeline, m.Rounds}, []any{got.Downtime, got.Timeline, got.Rounds}); diff != "" {
		t.Errorf("JSON (-want +got):\n%s", diff)
	}
}

// TestProgressOutInAPipe: written to anything but a terminal, progress is plain lines, one per
// change, with no control characters.
func TestProgressOutInAPipe(t *testing.T) {
	var b bytes.Buffer
	p := newProgressOut(&b, true)
	for _, l := range [][2]string{{"a", "Attesting"}, {"a", "Attesting"}, {"t1", "Transferring 10%"}, {"t1", "Transferring 11%"}, {"t5", "Transferring 50%"}} {
		p.show(l[0], l[1])
	}
	p.end()
	if got, want := b.String(), "Attesting\nTransferring 10%\nTransferring 50%\n"; got != want {
		t.Errorf("progress in a pipe:\n%q\nwant\n%q", got, want)
	}
	if strings.ContainsAny(b.String(), "\r\033") {
		t.Error("control characters in a pipe")
	}
	var quiet bytes.Buffer
	q := newProgressOut(&quiet, false)
	q.show("a", "Attesting")
	q.end()
	if quiet.Len() != 0 {
		t.Errorf("progress with -o json: %q", quiet.String())
	}
}

// TestInterruptedSaysTheMigrationGoesOn: Ctrl-C while following a migration says how to follow
// or abort it, not "context canceled", and ends with 130.
func TestInterruptedSaysTheMigrationGoesOn(t *testing.T) {
	var b bytes.Buffer
	err := interrupted(&b, "mig-1", &broker.Migration{ID: "mig-1", Phase: broker.PhaseTransferring})
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 130 {
		t.Fatalf("interrupted = %v, want exit 130", err)
	}
	for _, want := range []string{"migration mig-1 goes on", "Transferring", "lethectl migrations watch mig-1", "lethectl migrations abort mig-1"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("interrupted message %q lacks %q", b.String(), want)
		}
	}
}

// TestVersionCommand: "lethectl version" prints what --version prints.
func TestVersionCommand(t *testing.T) {
	a, _, code1 := runLethectl(t, "version")
	b, _, code2 := runLethectl(t, "--version")
	if code1 != 0 || code2 != 0 || a != b || !strings.HasPrefix(a, "lethectl ") {
		t.Errorf("version: %q (exit %d); --version: %q (exit %d)", a, code1, b, code2)
	}
}
