package migagent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
	"github.com/lethe-cc/lethe/migagent/libvirt"
	"github.com/lethe-cc/lethe/migagent/libvirt/libvirttest"
)

// fakeHypervisor is the agent's view of a libvirttest.Hypervisor: the fake returns its own
// concrete types where the interface names the agent's.
type fakeHypervisor struct{ *libvirttest.Hypervisor }

func (f fakeHypervisor) Begin(ctx context.Context, domain string, s libvirt.Settings) (sourceMigration, libvirt.Offer, error) {
	src, offer, err := f.Hypervisor.Begin(ctx, domain, s)
	if err != nil {
		return nil, offer, err
	}
	return src, offer, nil
}

func (f fakeHypervisor) Prepare(ctx context.Context, offer libvirt.Offer, listen libvirt.Endpoint) (destinationMigration, libvirt.Accepted, error) {
	dst, acc, err := f.Hypervisor.Prepare(ctx, offer, listen)
	if err != nil {
		return nil, acc, err
	}
	return dst, acc, nil
}

func (f fakeHypervisor) Listen(ctx context.Context, ep libvirt.Endpoint) (streamListener, error) {
	ln, err := f.Hypervisor.Listen(ctx, ep)
	if err != nil {
		return nil, err
	}
	return ln, nil
}

var _ hypervisor = fakeHypervisor{}

const lvDomain = "web-domain"

// lvNode is a node driving hv, with only what the libvirt migration paths use.
func lvNode(t *testing.T, host string, hv *libvirttest.Hypervisor) *Node {
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", host)
	n := &Node{
		cfg: Config{
			Host: host, Now: time.Now, DataListen: "127.0.0.1:0", Logger: log, Metrics: noMetrics{},
			Libvirt: LibvirtConfig{
				Socket: "/nonexistent/libvirt-sock", MigrateDir: t.TempDir(), PostCopyAfter: 3,
				ProgressInterval: 5 * time.Millisecond, PollInterval: time.Hour,
			},
		},
		log: log, advHost: "127.0.0.1", changed: make(chan struct{}, 1), life: t.Context(),
		guests: map[string]*guest{}, migs: map[string]*migration{}, lv: fakeHypervisor{hv},
	}
	n.backend = libvirtBackend{n}
	return n
}

func testSecret(t *testing.T, seed byte) *dataplane.SecretKey {
	t.Helper()
	b := make([]byte, dataplane.KeySize)
	for i := range b {
		b[i] = seed + byte(i)
	}
	k, err := dataplane.NewSecretKey(b)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func testHPKE(t *testing.T) *seal.PrivateKey {
	t.Helper()
	k, err := seal.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// lvMigrationRun is one libvirt migration between two nodes, from after the keys arrived
// (the destination receiving, the source transferring) to both tasks' end.
type lvMigrationRun struct {
	src, dst   *Node
	sm, dm     *migration
	srcCtxStop context.CancelFunc
	dstCtxStop context.CancelFunc
}

// startLibvirtMigration starts moving the source's guest domain (memory mem) to dst, with
// the real data plane between the nodes' tunnels. broker, if not nil, changes the source's
// transfer request and grant as a broker's request and the keybroker's grant would.
func startLibvirtMigration(t *testing.T, src, dst *Node, mem []byte, broker ...func(*agentapi.TransferRequest, *grant.Grant)) *lvMigrationRun {
	t.Helper()
	const id = "lv-1"
	srcID, dstID := testHPKE(t), testHPKE(t)
	dm, err := dst.backend.newDestination(&agentapi.PrepareRequest{MigrationID: id, Tenant: testTenant, VM: testVM, MemoryBytes: uint64(len(mem))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dm.ln.Close() })
	if _, err := dm.dst.Prepare(t.Context()); err != nil {
		t.Fatal(err)
	}
	dm.mu.Lock()
	dm.keys = secrets{hpke: dstID, recv: dataplane.Keys{TK: testSecret(t, 1), MDK: testSecret(t, 50), Identity: dstID, PeerKey: srcID.PublicKey()}}
	dst.mu.Lock()
	dst.migs[id] = dm
	dst.mu.Unlock()
	err = dst.start(dm, phaseReceiving, func(ctx context.Context) { dst.backend.receive(ctx, dm) })
	dcancel := dm.cancel
	dm.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}

	g := &guest{tenant: testTenant, vm: testVM, domain: lvDomain, memory: int64(len(mem)), mdk: testSecret(t, 30)}
	sm := newMigration(id, attest.RoleSource, testTenant, testVM, int64(len(mem)), phaseKeyed)
	sm.g, sm.keys = g, secrets{tk: testSecret(t, 1), hpke: srcID}
	sm.grant = &grant.Grant{DataEndpoint: dm.endpoint, Destination: &grant.End{HPKEPublicKey: dstID.PublicKey()}}
	src.mu.Lock()
	src.guests[g.key()] = g
	src.migs[id] = sm
	src.mu.Unlock()
	req := &agentapi.TransferRequest{MigrationID: id}
	for _, f := range broker {
		f(req, sm.grant)
	}
	if _, err := src.Transfer(t.Context(), req, nil); err != nil {
		t.Fatal(err)
	}
	sm.mu.Lock()
	scancel := sm.cancel
	sm.mu.Unlock()
	t.Cleanup(func() { scancel(); dcancel(); src.tasks.Wait() })
	return &lvMigrationRun{src: src, dst: dst, sm: sm, dm: dm, srcCtxStop: scancel, dstCtxStop: dcancel}
}

// lvOutcome is what a test checks at the end of a libvirt migration.
type lvOutcome struct {
	SrcCalls, DstCalls   []libvirttest.Call
	SrcDomain, DstDomain *libvirttest.DomainState // nil: no domain
	SrcCommitted         bool
	SrcPhase             agentapi.TransferPhase
	SrcGuest, DstGuest   bool // the node lists the guest
	DstCommitted         bool
	DstFailed            bool
}

func domainOf(h *libvirttest.Hypervisor) *libvirttest.DomainState {
	d, ok := h.Domain(lvDomain)
	if !ok {
		return nil
	}
	return &d
}

func (r *lvMigrationRun) outcome(srcHV, dstHV *libvirttest.Hypervisor) lvOutcome {
	<-r.sm.done
	<-r.dm.done
	r.sm.mu.Lock()
	defer r.sm.mu.Unlock()
	r.dm.mu.Lock()
	defer r.dm.mu.Unlock()
	r.src.mu.Lock()
	defer r.src.mu.Unlock()
	r.dst.mu.Lock()
	defer r.dst.mu.Unlock()
	key := guestKey(testTenant, testVM)
	return lvOutcome{
		SrcCalls: srcHV.Calls(), DstCalls: dstHV.Calls(),
		SrcDomain: domainOf(srcHV), DstDomain: domainOf(dstHV),
		SrcCommitted: r.sm.phase() == phaseCommitted, SrcPhase: r.sm.progress.Phase, SrcGuest: r.src.guests[key] != nil,
		DstCommitted: r.dm.phase() == phaseCommitted, DstFailed: r.dm.failure != "", DstGuest: r.dst.guests[key] != nil,
	}
}

// cutConn is a data-plane connection that breaks once limit bytes were written.
type cutConn struct {
	net.Conn
	left *atomic.Int64
}

func (c *cutConn) Write(b []byte) (int, error) {
	if c.left.Add(-int64(len(b))) < 0 {
		c.Conn.Close()
		return 0, errors.New("connection cut")
	}
	return c.Conn.Write(b)
}

// TestLibvirtMigration runs the agents' libvirt driver on both hosts, with the data plane
// between them, against in-memory hypervisors scripted to fail at each step: whatever
// fails, the guest ends running at exactly one host, the source unless the destination
// committed.
func TestLibvirtMigration(t *testing.T) {
	mem := make([]byte, 1<<20+4093)
	for i := range mem {
		mem[i] = byte(i*31 + i>>11)
	}
	metadata := GuestMetadata(testTenant, testVM)
	call := func(step libvirttest.Step, cancelled bool) libvirttest.Call {
		return libvirttest.Call{Step: step, Domain: lvDomain, Cancelled: cancelled}
	}
	running := &libvirttest.DomainState{State: libvirt.StateRunning, Memory: mem}
	failedAtSource := func(srcCalls, dstCalls []libvirttest.Call) lvOutcome {
		return lvOutcome{
			SrcCalls: srcCalls, DstCalls: dstCalls, SrcDomain: running,
			SrcPhase: agentapi.TransferFailed, SrcGuest: true, DstFailed: true,
		}
	}
	tests := map[string]struct {
		src, dst map[libvirttest.Step]libvirttest.Fault
		// cutAfter breaks the source's data-plane connection after that many bytes.
		cutAfter int64
		// cancelWhenHung cancels the source's transfer once this step hangs.
		cancelWhenHung libvirttest.Step
		want           lvOutcome
	}{
		"committed": {
			want: lvOutcome{
				SrcCalls:     []libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, false)},
				DstCalls:     []libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, false)},
				DstDomain:    running,
				SrcCommitted: true, SrcPhase: agentapi.TransferCommitted, DstCommitted: true, DstGuest: true,
			},
		},
		"confirm fails after the commit: the source domain is removed": {
			src: map[libvirttest.Step]libvirttest.Fault{libvirttest.StepConfirm: {Err: errors.New("confirm3 failed")}},
			want: lvOutcome{
				SrcCalls: []libvirttest.Call{
					call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, false),
					call(libvirttest.StepRemove, false),
				},
				DstCalls:     []libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, false)},
				DstDomain:    running,
				SrcCommitted: true, SrcPhase: agentapi.TransferCommitted, DstCommitted: true, DstGuest: true,
			},
		},
		"prepare fails at the destination": {
			dst: map[libvirttest.Step]libvirttest.Fault{libvirttest.StepPrepare: {Err: errors.New("prepare3 failed")}},
			want: failedAtSource(
				[]libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepConfirm, true)},
				[]libvirttest.Call{call(libvirttest.StepPrepare, false)},
			),
		},
		"perform fails mid-stream": {
			src: map[libvirttest.Step]libvirttest.Fault{libvirttest.StepPerform: {Err: errors.New("perform3 failed"), AfterBytes: 300 << 10}},
			want: failedAtSource(
				[]libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, true)},
				[]libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, true)},
			),
		},
		"transfer cancelled mid-perform": {
			src:            map[libvirttest.Step]libvirttest.Fault{libvirttest.StepPerform: {Hang: true, AfterBytes: 300 << 10}},
			cancelWhenHung: libvirttest.StepPerform,
			want: failedAtSource(
				[]libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, true)},
				[]libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, true)},
			),
		},
		"finish fails": {
			dst: map[libvirttest.Step]libvirttest.Fault{libvirttest.StepFinish: {Err: errors.New("finish3 failed")}},
			want: failedAtSource(
				[]libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, true)},
				[]libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, false), call(libvirttest.StepRemove, false)},
			),
		},
		"finish leaves the guest paused at the destination": {
			dst: map[libvirttest.Step]libvirttest.Fault{libvirttest.StepFinish: {Paused: true}},
			want: failedAtSource(
				[]libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, true)},
				[]libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, false), call(libvirttest.StepRemove, false)},
			),
		},
		"the data-plane connection breaks mid-stream": {
			cutAfter: 400 << 10,
			want: failedAtSource(
				[]libvirttest.Call{call(libvirttest.StepBegin, false), call(libvirttest.StepPerform, false), call(libvirttest.StepConfirm, true)},
				[]libvirttest.Call{call(libvirttest.StepPrepare, false), call(libvirttest.StepFinish, true)},
			),
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			srcHV, dstHV := libvirttest.New(), libvirttest.New()
			srcHV.Define(lvDomain, mem, metadata)
			for step, f := range tc.src {
				srcHV.Script(step, f)
			}
			for step, f := range tc.dst {
				dstHV.Script(step, f)
			}
			src, dst := lvNode(t, "src", srcHV), lvNode(t, "dst", dstHV)
			if tc.cutAfter > 0 {
				left := &atomic.Int64{}
				left.Store(tc.cutAfter)
				src.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
					c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
					if err != nil {
						return nil, err
					}
					return &cutConn{Conn: c, left: left}, nil
				}
			}
			run := startLibvirtMigration(t, src, dst, mem)
			if tc.cancelWhenHung != "" {
				<-srcHV.Hung(tc.cancelWhenHung)
				run.srcCtxStop()
			}
			got := run.outcome(srcHV, dstHV)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("outcome (-want +got):\n%s", diff)
			}
		})
	}
}

// TestLibvirtResumeUnknownSource checks that an abort of a source whose transfer ended in
// doubt cancels the begun migration, which resumes the guest there.
func TestLibvirtResumeUnknownSource(t *testing.T) {
	hv := libvirttest.New()
	hv.Define(lvDomain, []byte("memory"), "")
	n := lvNode(t, "src", hv)
	src, _, err := n.lv.Begin(t.Context(), lvDomain, libvirt.Settings{})
	if err != nil {
		t.Fatal(err)
	}
	m := &migration{id: "lv-1", g: &guest{domain: lvDomain}, lv: &lvMigration{src: src}}
	if err := n.backend.resume(t.Context(), m); err != nil {
		t.Fatal(err)
	}
	if err := n.backend.resume(t.Context(), m); err != nil {
		t.Fatalf("resuming again: %v", err)
	}
	want := []libvirttest.Call{{Step: libvirttest.StepBegin, Domain: lvDomain}, {Step: libvirttest.StepConfirm, Domain: lvDomain, Cancelled: true}}
	if diff := cmp.Diff(want, hv.Calls()); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}
	if d, ok := hv.Domain(lvDomain); !ok || d.State != libvirt.StateRunning {
		t.Errorf("domain after resuming: %+v, %v; want running", d, ok)
	}
}

// relay joins two tunnels as the data plane would, both ways, passing half-closes on and
// giving up on both when either side fails.
func relay(a, b *tunnel) {
	one := func(from, to *tunnel) {
		if _, err := io.Copy(to, from); err != nil {
			a.Close()
			b.Close()
			return
		}
		to.CloseWrite()
	}
	go one(a, b)
	go one(b, a)
}

// TestLibvirtDriverHypervisorKeepsStreamOpen runs both drivers over a relay instead of the
// data plane, with a destination hypervisor that never closes its side of the stream: the
// destination driver waits endTimeout for it, then ends the stream itself, and the guest
// runs at the destination.
func TestLibvirtDriverHypervisorKeepsStreamOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mem := bytes.Repeat([]byte("guest page "), 20000)
		srcHV, dstHV := libvirttest.New(), libvirttest.New()
		srcHV.Define(lvDomain, mem, GuestMetadata(testTenant, testVM))
		dstHV.Script(libvirttest.StepPrepare, libvirttest.Fault{KeepOpen: true})
		src, dst := lvNode(t, "src", srcHV), lvNode(t, "dst", dstHV)
		g := &guest{tenant: testTenant, vm: testVM, domain: lvDomain, memory: int64(len(mem))}
		sm := &migration{id: "lv-1", role: attest.RoleSource, tenant: testTenant, vm: testVM, size: int64(len(mem)), g: g, lv: &lvMigration{tun: newTunnel(true)}}
		dm := &migration{id: "lv-1", role: attest.RoleDestination, tenant: testTenant, vm: testVM, size: int64(len(mem)), lv: &lvMigration{tun: newTunnel(false)}}
		relay(sm.lv.tun, dm.lv.tun)
		start := time.Now()
		sd := &sourceDriver{n: src, m: sm}
		var dd destinationDriver
		var wg sync.WaitGroup
		wg.Go(func() { sd.run(t.Context()) })
		wg.Go(func() { dd.run(t.Context(), dst, dm) })
		wg.Wait()
		if err := errors.Join(sd.err, dd.err); err != nil {
			t.Fatal(err)
		}
		if elapsed := time.Since(start); elapsed < endTimeout {
			t.Errorf("the migration took %v, less than the %v the destination waits for its hypervisor", elapsed, endTimeout)
		}
		want := []libvirttest.Call{{Step: libvirttest.StepPrepare, Domain: lvDomain}, {Step: libvirttest.StepFinish, Domain: lvDomain}}
		if diff := cmp.Diff(want, dstHV.Calls()); diff != "" {
			t.Errorf("destination calls (-want +got):\n%s", diff)
		}
		if d, ok := dstHV.Domain(lvDomain); !ok || d.State != libvirt.StateRunning || !bytes.Equal(d.Memory, mem) {
			t.Errorf("destination domain: %v, %v with %d bytes; want running with %d", ok, d.State, len(d.Memory), len(mem))
		}
		if !dd.finished || !bytes.Equal(sd.cookie, []byte("Finish:"+lvDomain)) {
			t.Errorf("finished %v, source holds cookie %q", dd.finished, sd.cookie)
		}
	})
}

// TestLibvirtSourceHoldsToTheGrant: the broker is the attacker. It asks the source for a
// transfer with no downtime limit, or a looser one than the tenant's policy, to an agent whose
// operator allows post-copy; the keybroker's grant states the tenant's 100 ms and no
// post-copy. The source begins the migration under the tenant's limit, without post-copy.
func TestLibvirtSourceHoldsToTheGrant(t *testing.T) {
	mem := make([]byte, 1<<20)
	for name, asked := range map[string]time.Duration{"no limit": 0, "a looser limit": time.Second} {
		t.Run(name, func(t *testing.T) {
			srcHV, dstHV := libvirttest.New(), libvirttest.New()
			srcHV.Define(lvDomain, mem, GuestMetadata(testTenant, testVM))
			src, dst := lvNode(t, "src", srcHV), lvNode(t, "dst", dstHV)
			src.cfg.Libvirt.Settings = libvirt.Settings{MaxDowntime: 2 * time.Second, PostCopy: true}
			run := startLibvirtMigration(t, src, dst, mem, func(req *agentapi.TransferRequest, g *grant.Grant) {
				req.MaxDowntime = asked
				g.MaxDowntime, g.PostCopy = 100*time.Millisecond, false
			})
			run.outcome(srcHV, dstHV)
			want := []libvirt.Settings{{MaxDowntime: 100 * time.Millisecond, AutoConverge: true}}
			if diff := cmp.Diff(want, srcHV.BegunSettings()); diff != "" {
				t.Errorf("settings the source began with (-want +got):\n%s", diff)
			}
		})
	}
}

// TestLibvirtSourceCarriesTheLanesTheDestinationTakes: a source set to carry two multifd
// channels migrates to a destination that takes none (an agent that predates lanes, or one set
// to 0; the transfer request's Lanes is what it answered) on one stream, where it would
// otherwise be refused at the handshake and leave the guest where it was.
func TestLibvirtSourceCarriesTheLanesTheDestinationTakes(t *testing.T) {
	mem := make([]byte, 1<<20)
	srcHV, dstHV := libvirttest.New(), libvirttest.New()
	srcHV.Define(lvDomain, mem, GuestMetadata(testTenant, testVM))
	src, dst := lvNode(t, "src", srcHV), lvNode(t, "dst", dstHV)
	src.cfg.Libvirt.Settings = libvirt.Settings{MaxDowntime: 2 * time.Second, Parallel: 2}
	run := startLibvirtMigration(t, src, dst, mem, func(req *agentapi.TransferRequest, _ *grant.Grant) { req.Lanes = 0 })
	ended := make(chan lvOutcome, 1)
	go func() { ended <- run.outcome(srcHV, dstHV) }()
	select {
	case o := <-ended:
		if !o.SrcCommitted || !o.DstCommitted {
			t.Fatalf("source committed %v, destination committed %v (failed %v); want both", o.SrcCommitted, o.DstCommitted, o.DstFailed)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the migration did not end within 30 s (source began with %+v)", srcHV.BegunSettings())
	}
	want := []libvirt.Settings{{MaxDowntime: 2 * time.Second}}
	if diff := cmp.Diff(want, srcHV.BegunSettings()); diff != "" {
		t.Errorf("settings the source began with (-want +got):\n%s", diff)
	}
}

func TestSourceParallel(t *testing.T) {
	for _, tc := range []struct{ own, lanes, want int }{
		{0, 0, 0}, {2, 0, 0}, {2, 1, 1}, {2, 2, 2}, {2, 8, 2}, {0, 4, 0}, {2, -1, 0},
	} {
		if got := sourceParallel(tc.own, tc.lanes); got != tc.want {
			t.Errorf("sourceParallel(%d, %d) = %d, want %d", tc.own, tc.lanes, got, tc.want)
		}
	}
}
