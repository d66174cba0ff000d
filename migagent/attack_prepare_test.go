package migagent

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// pausingCtx is a context whose first Err call signals reached and waits for release: a
// point at which a test can run other requests while a request is under way.
type pausingCtx struct {
	context.Context
	once             sync.Once
	reached, release chan struct{}
}

func newPausingCtx(ctx context.Context) *pausingCtx {
	return &pausingCtx{Context: ctx, reached: make(chan struct{}), release: make(chan struct{})}
}

func (c *pausingCtx) Err() error {
	c.once.Do(func() {
		close(c.reached)
		<-c.release
	})
	return c.Context.Err()
}

// TestPrepareAgainExcludesAbort repeats a Prepare and runs an Abort of the same migration
// while the repeat is about to scrub the receive region. The repeat must hold the
// migration's lock from its check of the phase to its end: else the abort unmaps the
// region under the scrub (a crash of the agent), or a Keys starts a reception into the
// region being scrubbed.
func TestPrepareAgainExcludesAbort(t *testing.T) {
	kbPub, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-c", kbPub)
	prep := func(ctx context.Context) (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panic: %v", r)
			}
		}()
		nonce := make([]byte, 32)
		rand.Read(nonce)
		_, err = n.Prepare(ctx, &agentapi.PrepareRequest{MigrationID: "m", Nonce: nonce, Tenant: "t", VM: "v", MemoryBytes: 1 << 20})
		return err
	}
	if err := prep(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx := newPausingCtx(t.Context())
	prepared := make(chan error, 1)
	go func() { prepared <- prep(ctx) }()
	<-ctx.reached

	aborted := make(chan error, 1)
	go func() {
		_, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m", Reason: "test"})
		aborted <- err
	}()
	var aerr error
	done := false
	select {
	case aerr = <-aborted:
		done = true
	case <-time.After(200 * time.Millisecond): // the abort waits for the Prepare
	}
	close(ctx.release)
	if err := <-prepared; err != nil {
		t.Errorf("the repeated Prepare: %v", err)
	}
	if !done {
		aerr = <-aborted
	}
	if aerr != nil {
		t.Fatalf("abort: %v", aerr)
	}
	n.mu.Lock()
	m := n.migs["m"]
	n.mu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase() != phaseAborted || !m.keys.empty() || m.region != nil {
		t.Errorf("after the abort: phase %s, keys held %v, region kept %v", m.phase(), !m.keys.empty(), m.region != nil)
	}
}

// failingAttester produces no evidence.
type failingAttester struct{ attest.Attester }

func (failingAttester) Attest(context.Context, [attest.ReportDataSize]byte) ([]byte, error) {
	return nil, errors.New("no evidence today")
}

// TestPrepareOfLibvirtDestinationFailsCleanly: a libvirt destination has no receive region;
// a Prepare that fails after making it (here: the attester fails, as it does when the
// request's context ends) must release its listener and return the error, not panic.
func TestPrepareOfLibvirtDestinationFailsCleanly(t *testing.T) {
	kbPub, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-c", kbPub)
	n.backend = libvirtBackend{n}
	n.cfg.Attester = failingAttester{n.cfg.Attester}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	err := func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panic: %v", r)
			}
		}()
		_, err = n.Prepare(t.Context(), &agentapi.PrepareRequest{MigrationID: "m", Nonce: nonce, Tenant: "t", VM: "v", MemoryBytes: 1 << 20})
		return err
	}()
	if err == nil || strings.HasPrefix(err.Error(), "panic") {
		t.Fatalf("Prepare with a failing attester: %v, want its error", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.migs) != 0 {
		t.Errorf("a failed Prepare left migrations %v", n.migs)
	}
}

// TestPrepareRefusesBeyondAllocatableMemory: a broker that ignores the host's stated
// capacity (or lies about its record) cannot overcommit the host. Guests arriving count as
// committed until they end; after one is aborted its memory is free again.
func TestPrepareRefusesBeyondAllocatableMemory(t *testing.T) {
	kbPub, _, _ := ed25519.GenerateKey(rand.Reader)
	n := unresolvedNode(t, t.TempDir(), "host-c", kbPub)
	n.cfg.AllocatableBytes = 3 << 20
	prepare := func(id, vm string, size uint64) error {
		nonce := make([]byte, 32)
		rand.Read(nonce)
		_, err := n.Prepare(t.Context(), &agentapi.PrepareRequest{MigrationID: id, Nonce: nonce, Tenant: "t", VM: vm, MemoryBytes: size})
		return err
	}
	if err := prepare("m-1", "a", 2<<20); err != nil {
		t.Fatal(err)
	}
	err := prepare("m-2", "b", 2<<20)
	if !errors.Is(err, agentapi.ErrConflict) || !strings.Contains(err.Error(), "does not fit") || !strings.Contains(err.Error(), "2 MiB are committed or arriving") {
		t.Fatalf("a second 2 MiB guest on a host offering 3 MiB: %v, want a conflict saying what is committed", err)
	}
	if err := prepare("m-3", "c", 1<<20); err != nil {
		t.Fatalf("a 1 MiB guest that fits: %v", err)
	}
	if _, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m-1", Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	if err := prepare("m-2", "b", 2<<20); err != nil {
		t.Fatalf("after the first arrival was aborted: %v", err)
	}
}
