package migagent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// backend holds and moves the node's guests of one kind. A node has one, chosen by its
// configuration: in-process memory (memoryBackend, below) or the host's libvirt domains
// (libvirtBackend, libvirt.go). The migration's state machine (state.go, handler.go) is the
// same for both; a backend only moves bytes and drives what runs the guest.
type backend interface {
	// newDestination makes what an incoming migration is received into: a migration in
	// phase prepared with its data-plane destination and listener.
	newDestination(req *agentapi.PrepareRequest) (*migration, error)
	// sender returns the task that transfers m's guest with keys and ends it with
	// Node.sent. Callers hold m.mu.
	sender(m *migration, req *agentapi.TransferRequest, keys dataplane.Keys, report agentapi.ProgressFunc) (func(context.Context), error)
	// receive runs m's reception to its end and records it with Node.received.
	receive(ctx context.Context, m *migration)
	// resume runs again a source guest that a transfer in doubt left paused. Callers hold
	// m.mu.
	resume(ctx context.Context, m *migration) error
	// discard removes what is left here of guest g, whose migration committed after all,
	// and adds what it erased to st.
	discard(ctx context.Context, g *guest, st *attest.ErasureStatement)
}

// memoryBackend holds guests in process memory (dataplane Regions, each run by a synthetic
// workload) and moves them page by page through the data plane's pre-copy.
type memoryBackend struct{ n *Node }

// newDestination makes the receive region, the data-plane destination and its listener of
// a migration in phase prepared.
func (b memoryBackend) newDestination(req *agentapi.PrepareRequest) (*migration, error) {
	n := b.n
	// A guest larger than the memory the host has free would be received until the kernel
	// killed the agent, taking every other migration with it: refused up front.
	if avail, err := MemAvailable(); err == nil && req.MemoryBytes > avail {
		return nil, fmt.Errorf("%w: a guest of %d bytes does not fit in the %d bytes of memory available on host %s", agentapi.ErrConflict, req.MemoryBytes, avail, n.cfg.Host)
	}
	region, err := dataplane.NewRegion(int64(req.MemoryBytes))
	if err != nil {
		return nil, fmt.Errorf("making the receive region: %w", err)
	}
	dst, err := dataplane.NewDestination(dataplane.DestinationConfig{
		MigrationID: req.MigrationID, Region: region,
		// The source proposes zero-page elision only where the tenant's policy allows it.
		ZeroPageElision: true,
		Logger:          n.log,
	})
	if err != nil {
		region.Close()
		return nil, err
	}
	ln, endpoint, err := n.listen()
	if err != nil {
		region.Close()
		return nil, err
	}
	m := newMigration(req.MigrationID, attest.RoleDestination, req.Tenant, req.VM, int64(req.MemoryBytes), phasePrepared)
	m.dst, m.region, m.ln, m.endpoint = dst, region, ln, endpoint
	return m, nil
}

// sender returns the task that runs the data plane's pre-copy of m's guest.
func (b memoryBackend) sender(m *migration, req *agentapi.TransferRequest, keys dataplane.Keys, report agentapi.ProgressFunc) (func(context.Context), error) {
	n, g := b.n, m.g
	tl := &transferLog{}
	var guest dataplane.Pauser
	if g.workload != nil {
		guest = g.workload
	}
	limit := downtimeLimit(req.MaxDowntime, m.grant)
	// Under a downtime limit the data plane pauses the guest once the dirty set fits the
	// limit at the throughput it measures, throttles a guest that dirties memory too fast for
	// that (auto-converge), as libvirt guests are, and gives up without pausing one that
	// still does not fit after MaxRounds.
	src, err := dataplane.NewSource(dataplane.SourceConfig{
		MigrationID: m.id, Peer: m.grant.DataEndpoint, Dial: n.dial, Streams: cmp.Or(req.Streams, n.cfg.Streams),
		Region: g.region, Guest: guest, ZeroPageElision: req.ZeroPageElision && m.grant.ZeroPageElision,
		MaxRounds: n.cfg.MaxRounds, ConvergedPages: n.cfg.ConvergedPages, MaxDowntime: limit,
		AutoConverge: limit > 0 && !n.cfg.NoAutoConverge,
		Progress:     func(p dataplane.Progress) { n.onProgress(m, tl, p, report) },
		Logger:       n.log,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	return func(ctx context.Context) { b.runSource(ctx, m, src, tl, keys, report) }, nil
}

// runSource runs the source's data plane. On commit the guest leaves the host: the data
// plane has zeroized TK and MDK and scrubbed its pages.
func (b memoryBackend) runSource(ctx context.Context, m *migration, src *dataplane.Source, tl *transferLog, keys dataplane.Keys, report agentapi.ProgressFunc) {
	n := b.n
	res, err := src.Run(ctx, keys)
	end := n.cfg.Now()
	n.cfg.Metrics.BytesSent(res.BytesSent)
	g := m.g
	out := sendOutcome{
		progress: agentapi.Progress{
			MigrationID: m.id, Bytes: uint64(res.BytesSent), Pages: uint64(res.PagesSent), TotalBytes: uint64(m.size),
			Round: len(res.Rounds), Time: end, MemoryDigest: res.MemoryDigest, Rounds: tl.rounds,
		},
		err: err,
	}
	if len(res.Commit.MAC) != 0 {
		out.progress.Downtime, out.progress.DowntimeSource = res.Downtime, agentapi.DowntimeAgent
	}
	if len(res.Commit.MAC) == 0 {
		if errors.Is(err, dataplane.ErrCommitUnknown) && errors.Is(err, dataplane.ErrPeerAborted) {
			// The destination said it aborted: resuming cannot make two running copies.
			if rerr := g.workload.Resume(context.WithoutCancel(ctx)); rerr != nil {
				n.log.Error("Resuming the guest failed", attrMigration, m.id, attrError, rerr)
			}
		}
		n.sent(m, out, report, nil)
		return
	}
	out.commit, out.erasure = &res.Commit, res.Erasure
	n.sent(m, out, report, func() {
		if err := g.region.Close(); err != nil {
			n.log.Warn("Releasing guest memory failed", attrMigration, m.id, attrError, err)
		}
	})
}

// receive runs the destination's data plane under ctx and records how it ended.
func (b memoryBackend) receive(ctx context.Context, m *migration) {
	n := b.n
	keys := m.takeReceiveKeys()
	res, err := m.dst.Receive(ctx, m.ln, keys)
	if err != nil {
		if res.Erasure == nil {
			// Receive refused to start and erased nothing: erase here (MDK, the region).
			st, _ := m.dst.Abort(ctx, keys)
			res.Erasure = &st
		}
		n.received(m, nil, &res, err)
		return
	}
	m.mu.Lock()
	region := m.region
	m.mu.Unlock()
	g, err := newGuest(m.tenant, m.vm, region, n.cfg.WorkloadRate)
	if err != nil { // cannot happen for a valid region; keep nothing
		st, _ := m.dst.Abort(ctx, keys)
		n.received(m, nil, &dataplane.DestinationResult{Erasure: &st}, fmt.Errorf("taking in the received guest: %w", err))
		return
	}
	g.mdk = keys.MDK
	n.received(m, g, &res, nil)
}

// resume runs the guest's workload again.
func (memoryBackend) resume(ctx context.Context, m *migration) error {
	return m.g.workload.Resume(ctx)
}

// discard scrubs the guest's memory and releases it.
func (b memoryBackend) discard(_ context.Context, g *guest, st *attest.ErasureStatement) {
	b.n.mu.Lock()
	region := g.region
	g.region = nil
	b.n.mu.Unlock()
	if region == nil {
		return
	}
	if n, err := region.Scrub(); err == nil {
		st.PagesScrubbed, st.PageBytesScrubbed = uint64(n)/dataplane.PageSize, uint64(n)
	} else {
		b.n.log.Error("Scrubbing the guest's memory failed", attrTenant, g.tenant, attrVM, g.vm, attrError, err)
	}
	if err := region.Close(); err != nil {
		b.n.log.Warn("Releasing guest memory failed", attrTenant, g.tenant, attrVM, g.vm, attrError, err)
	}
}

// MemAvailable returns the memory the kernel estimates is available for new allocations
// without swapping (MemAvailable in /proc/meminfo), in bytes.
func MemAvailable() (uint64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	return parseMemAvailable(b)
}

func parseMemAvailable(meminfo []byte) (uint64, error) {
	for line := range strings.Lines(string(meminfo)) {
		rest, ok := strings.CutPrefix(line, "MemAvailable:")
		if !ok {
			continue
		}
		kib, unit, _ := strings.Cut(strings.TrimSpace(rest), " ")
		n, err := strconv.ParseUint(kib, 10, 64)
		if err != nil || strings.TrimSpace(unit) != "kB" {
			return 0, fmt.Errorf("reading MemAvailable %q", strings.TrimSpace(rest))
		}
		return n << 10, nil
	}
	return 0, errors.New("no MemAvailable in /proc/meminfo")
}
