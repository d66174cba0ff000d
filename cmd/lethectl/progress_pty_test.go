//go:build linux

package main

import (
	"bytes"
	"io"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/ptytest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// capture collects what is read from r until it ends.
type capture struct {
	mu   sync.Mutex
	b    bytes.Buffer
	done chan struct{}
}

func newCapture(r io.Reader) *capture {
	c := &capture{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			c.mu.Lock()
			c.b.Write(buf[:n])
			c.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return c
}

func (c *capture) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.String()
}

// waitFor waits until the captured output contains s, and fails the test after 20 s.
func (c *capture) waitFor(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(c.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("output never showed %q:\n%q", s, c.String())
		}
		<-time.After(10 * time.Millisecond)
	}
}

// migrateWaitTo runs "lethectl migrate web --to h2 --wait" against a fleet, its stderr on
// stderr (whose output out captures), reports two pre-copy rounds from the source's agent
// (the second not converging) and commits, and returns lethectl's stdout.
func migrateWaitTo(t *testing.T, stderr *os.File, out *capture) string {
	f := newFleet(t)
	src := f.addHost("h1", 115, "web")
	f.addHost("h2", 120)
	var stdout bytes.Buffer
	cmd := newRootCmd()
	cmd.SetOut(&stdout)
	cmd.SetErr(stderr)
	cmd.SetArgs([]string{"migrate", "web", "--to", "h2", "--wait", "--tenant", "acme", "--nats-url", f.srv.URL})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(t.Context()) }()

	op := broker.NewOperatorClient(f.connect(natsauth.RoleOperator, ""))
	var id string
	deadline := time.Now().Add(20 * time.Second)
	for {
		list, err := op.ListMigrations(t.Context(), &broker.ListMigrationsRequest{Active: true})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.Migrations) == 1 {
			id = list.Migrations[0].ID
			// The agent takes reports once the broker started the transfer.
			if src.Report(id, agentapi.Progress{Phase: agentapi.TransferPrecopy, Bytes: 1 << 19, Pages: 128, TotalBytes: 1 << 20,
				Round: 1, DirtyRate: 1 << 16, Throughput: 1 << 20, ETA: 3 * time.Second}) == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the migration never started its transfer")
		}
		<-time.After(10 * time.Millisecond)
	}
	out.waitFor(t, " 50%")
	if err := src.Report(id, agentapi.Progress{Phase: agentapi.TransferPrecopy, Bytes: 3 << 18, Pages: 192, TotalBytes: 1 << 20,
		Round: 2, DirtyRate: 1 << 22, NotConverging: true}); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "not converging")
	if err := src.Commit(id); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("lethectl: %v\n%s", err, out.String())
	}
	return stdout.String()
}

// TestMigrateWaitOnATerminal: on a terminal of 60 columns, the progress of "migrate --wait" is
// one line redrawn in place (carriage return, erase line) that never reaches the last column,
// and the migration ends with its summary.
func TestMigrateWaitOnATerminal(t *testing.T) {
	const cols = 60
	master, slave := ptytest.Open(t, 24, cols)
	defer master.Close()
	out := newCapture(master)
	stdout := migrateWaitTo(t, slave, out)
	slave.Close()
	<-out.done // the master reads EIO once the slave is closed
	got := out.String()
	if !strings.Contains(got, "\r\x1b[K") {
		t.Fatalf("no line redrawn in place on a terminal:\n%q", got)
	}
	if strings.Contains(got, "ETA 0s") {
		t.Errorf("ETA 0s shown:\n%q", got)
	}
	erase := regexp.MustCompile("\x1b\\[K")
	for _, line := range regexp.MustCompile("[\r\n]").Split(erase.ReplaceAllString(got, ""), -1) {
		if n := utf8.RuneCountInString(line); n >= cols {
			t.Errorf("a line of %d columns on a terminal of %d: %q", n, cols, line)
		}
	}
	for _, want := range []string{"Migration mig-", ": erased", "Data moved:", "Rounds:       2", "Downtime:     42ms", "lethectl receipt get mig-"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("summary lacks %q:\n%s", want, stdout)
		}
	}
}

// TestMigrateWaitInAPipe: in a pipe, the progress of "migrate --wait" is plain lines with no
// control characters.
func TestMigrateWaitInAPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	out := newCapture(r)
	migrateWaitTo(t, w, out)
	w.Close()
	<-out.done
	got := out.String()
	if strings.ContainsAny(got, "\r\x1b") {
		t.Errorf("control characters in a pipe:\n%q", got)
	}
	for _, want := range []string{"round 1", "not converging", "Erased"} {
		if !strings.Contains(got, want) {
			t.Errorf("pipe output lacks %q:\n%s", want, got)
		}
	}
}
