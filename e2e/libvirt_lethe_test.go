//go:build libvirt

package e2e

import (
	"bytes"
	"compress/flate"
	"context"
	"crypto/ed25519"
	"crypto/sha512"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/stacktest"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/migagent"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/libvirt"
)

const (
	letheTenant = "demo"
	letheVM     = "memtest"
	// letheLinuxVM is the Linux guest's name in Lethe.
	letheLinuxVM = "linux"
	// letheWait bounds every wait for the control plane.
	letheWait = 3 * time.Minute
)

// letheLibvirtPolicy is the CI policy (examples/policies/ci-emulated.yaml) with the
// clean-memory requirement (on by default) turned off: a libvirt destination receives into a freshly started
// hypervisor whose memory the agent neither zeroes nor reads back, and says so in its
// statement (zeroed false), which that requirement would deny.
const letheLibvirtPolicy = `apiVersion: lethe.dev/v1
kind: MigrationPolicy
metadata:
  tenant: demo
  name: ci-emulated-libvirt
  policySvn: 1
spec:
  guests: [memtest, linux]
  source:
    platforms: [emulated-sev-snp]
    snp:
      allowDebug: false
  destination:
    platforms: [emulated-sev-snp]
    snp:
      allowDebug: false
    clean:
      requireStatement: false
  destinationTcbAtLeastSource: true
  erasure:
    deadline: 2m
`

// letheEnv is Lethe's control plane for the libvirt hosts: a real NATS server, a real
// Vault, the keybroker behind its NATS edge and the broker, with an agent (an in-process
// migagent.Node on an emulated SEV-SNP platform) per libvirt host.
type letheEnv struct {
	// postCopyAfter is the agents' LibvirtConfig.PostCopyAfter, zero for their default.
	postCopyAfter uint64
	t             testing.TB
	nats          *natstest.Server
	vault         *vaulttest.Server
	kbPub         ed25519.PublicKey
	tenant        *broker.Client
	js            jetstream.JetStream
	emuDir        string
	log           *slog.Logger
	agents        map[string]*letheAgent
	// vm is the guest's name in Lethe: letheVM unless a test sets another.
	vm string
}

type letheAgent struct {
	n      *migagent.Node
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func newLetheEnv(t testing.TB) *letheEnv {
	t.Helper()
	return newLetheEnvWith(t, letheLibvirtPolicy)
}

// newLetheEnvWith is newLetheEnv with the tenant's policy (YAML) policy.
func newLetheEnvWith(t testing.TB, policy string) *letheEnv {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	s := stacktest.Start(t, stacktest.Options{
		Tenant: letheTenant, PolicyName: "ci-emulated-libvirt.yaml", Policy: []byte(policy),
		AgentTimeout: 5 * time.Second, Logger: log,
	})
	return &letheEnv{
		t: t, nats: s.NATS, vault: s.Vault, kbPub: s.KeybrokerPub, tenant: s.Tenant, js: s.JS,
		emuDir: s.EmulatorDir, log: log, agents: map[string]*letheAgent{}, vm: letheVM,
	}
}

// startAgent starts the agent of a libvirt host, on the shared emulator with its own chip
// ID; dial, if not nil, carries its outgoing data-plane connections.
func (e *letheEnv) startAgent(host string, settings libvirt.Settings, dial func(context.Context, string, string) (net.Conn, error)) *letheAgent {
	e.t.Helper()
	chip := sha512.Sum512([]byte(host))
	tcb := attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 115}
	plat, err := emulate.Open(e.emuDir, attest.PlatformEmulatedSEVSNP, emulate.Options{TCB: &tcb, ChipID: chip[:]})
	if err != nil {
		e.t.Fatal(err)
	}
	n, err := migagent.New(migagent.Config{
		Host: host, Conn: e.nats.Connect(e.t), Attester: plat, KeybrokerKey: e.kbPub, HeartbeatInterval: 500 * time.Millisecond,
		Logger: e.log.With("node", host), DataDial: dial,
		Libvirt: migagent.LibvirtConfig{
			Socket: socketOf(host), MigrateDir: filepath.Join(stateDir(), host, "migrate"),
			Settings: settings, ProgressInterval: 200 * time.Millisecond, PostCopyAfter: e.postCopyAfter,
		},
	})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &letheAgent{n: n, cancel: cancel, done: make(chan error, 1)}
	go func() { a.done <- n.Run(ctx) }()
	e.t.Cleanup(func() { a.stop(e.t) })
	e.agents[host] = a
	// A migration may name the host only once its record is there.
	watchKV(e, agentapi.HostsBucket, host, func(*agentapi.HostRecord) bool { return true })
	return a
}

// stop stops the agent and waits for Run to return.
func (a *letheAgent) stop(t testing.TB) {
	a.once.Do(func() {
		a.cancel()
		select {
		case err := <-a.done:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(letheWait):
			t.Error("agent did not stop")
		}
	})
}

// watchKV follows key in bucket until cond holds for its JSON value.
func watchKV[T any](e *letheEnv, bucket, key string, cond func(*T) bool) *T {
	e.t.Helper()
	return stacktest.WatchKV(e.t, e.js, bucket, key, letheWait, cond)
}

func (e *letheEnv) waitGuest(host string, want bool) {
	e.t.Helper()
	watchKV(e, agentapi.HostsBucket, host, func(r *agentapi.HostRecord) bool {
		return (r.Guest(letheTenant, e.vm) != nil) == want
	})
}

// adopt makes the guest on host Lethe's, in epoch 1.
func (e *letheEnv) adopt(host string) {
	e.t.Helper()
	e.waitGuest(host, true)
	g, err := e.tenant.AdoptGuest(e.t.Context(), &broker.AdoptGuestRequest{VM: e.vm, Host: host})
	if err != nil {
		e.t.Fatalf("adopting: %v", err)
	}
	if g.Epoch != 1 || g.Host != host {
		e.t.Fatalf("adopted guest: %+v", g)
	}
}

// migrate moves the guest to dst through Lethe and returns the migration when it ended.
func (e *letheEnv) migrate(dst string) *broker.Migration {
	e.t.Helper()
	resp, err := e.tenant.CreateMigration(e.t.Context(), &broker.CreateMigrationRequest{VM: e.vm, Destination: dst})
	if err != nil {
		e.t.Fatalf("migrating to %s: %v", dst, err)
	}
	return e.waitEnd(resp.Migration.ID)
}

func (e *letheEnv) waitEnd(id string) *broker.Migration {
	e.t.Helper()
	return watchKV(e, broker.MigrationsBucket, id, func(m *broker.Migration) bool { return m.Phase.Terminal() })
}

// receipt fetches and verifies a migration's receipt with the keybroker's public key.
func (e *letheEnv) receipt(id string) *receipt.Receipt {
	e.t.Helper()
	r, err := e.tenant.GetReceipt(e.t.Context(), id)
	if err != nil {
		e.t.Fatalf("getting receipt of %s: %v", id, err)
	}
	envl, err := receipt.Parse(r.Envelope)
	if err != nil {
		e.t.Fatal(err)
	}
	rc, err := receipt.Verify(envl, e.kbPub)
	if err != nil {
		e.t.Fatalf("verifying receipt of %s: %v", id, err)
	}
	return rc
}

// transitKeys reports which of names exist in Vault, read straight from Vault.
func (e *letheEnv) transitKeys(names ...string) map[string]bool {
	e.t.Helper()
	out := map[string]bool{}
	for _, name := range names {
		s, err := e.vault.Client.Logical().ReadWithContext(e.t.Context(), "transit/keys/"+name)
		if err != nil {
			e.t.Fatal(err)
		}
		out[name] = s != nil
	}
	return out
}

// withGuestMetadata makes the test guest the Lethe guest demo/memtest.
func withGuestMetadata(c *libvirt.GuestConfig) {
	c.Metadata = migagent.GuestMetadata(letheTenant, letheVM)
}

// withLinuxMetadata makes the test guest the Lethe guest demo/linux.
func withLinuxMetadata(c *libvirt.GuestConfig) {
	c.Metadata = migagent.GuestMetadata(letheTenant, letheLinuxVM)
}

// plaintextMarkers are byte strings of the QEMU migration stream of the memtest86+ guest in
// the clear: the stream's magic and version, the machine type in its configuration section,
// the RAM block's name with its length byte, a device section's name, and a string of the
// memtest86+ image in guest memory. TestLibvirtRelayedMigration checks that a plaintext
// stream holds them all; the stream between the agents must hold none. Each is long enough
// (8 bytes or more) not to turn up by chance in a few hundred MiB of ciphertext.
var plaintextMarkers = [][]byte{
	[]byte("QEVM\x00\x00\x00\x03"),
	[]byte("pc-i440fx-"),
	[]byte("\x06pc.ram"),
	[]byte("cpu_common"),
	[]byte("Memtest86+"),
}

// multifdMagic opens each of QEMU's multifd channels: its magic and version, in the clear
// on a plain multifd connection.
var multifdMagic = []byte("\x11\x22\x33\x44\x00\x00\x00\x01")

// scanner counts bytes and finds markers in a stream read in chunks.
type scanner struct {
	mu      sync.Mutex
	n       atomic.Int64
	tail    []byte
	found   map[string]bool
	markers [][]byte
	// sample keeps the first bytes, for a compressibility check.
	sample []byte
}

const sampleSize = 4 << 20

func newScanner(markers [][]byte) *scanner {
	return &scanner{found: map[string]bool{}, markers: markers}
}

func (s *scanner) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n.Add(int64(len(p)))
	if len(s.sample) < sampleSize {
		s.sample = append(s.sample, p[:min(len(p), sampleSize-len(s.sample))]...)
	}
	buf := append(s.tail, p...)
	longest := 0
	for _, m := range s.markers {
		longest = max(longest, len(m))
		if bytes.Contains(buf, m) {
			s.found[string(m)] = true
		}
	}
	keep := min(len(buf), longest-1)
	s.tail = append(s.tail[:0:0], buf[len(buf)-keep:]...)
	return len(p), nil
}

// seen returns the markers found, in the order of markers.
func (s *scanner) seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, m := range s.markers {
		if s.found[string(m)] {
			out = append(out, fmt.Sprintf("%q", m))
		}
	}
	return out
}

// compressRatio is the size of the flate-compressed sample over its size: about 1 for
// ciphertext, far below for a migration stream of a memtest86+ guest.
func (s *scanner) compressRatio() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.sample) == 0 {
		return 0
	}
	var b bytes.Buffer
	w, _ := flate.NewWriter(&b, flate.BestSpeed)
	w.Write(s.sample)
	w.Close()
	return float64(b.Len()) / float64(len(s.sample))
}

// wireRecorder is a recording loopback relay between the agents' data endpoints: each
// data-plane connection the source opens goes to a relay listener of its own, which dials
// the destination's endpoint and copies both ways, scanning every byte.
type wireRecorder struct {
	t     testing.TB
	up    *scanner // source to destination
	down  *scanner // destination to source
	conns atomic.Int32
	wg    sync.WaitGroup
}

// newWireRecorder records the agents' traffic and looks for plaintextMarkers and extra
// markers in it.
func newWireRecorder(t testing.TB, extra ...[]byte) *wireRecorder {
	markers := append(slices.Clone(plaintextMarkers), extra...)
	r := &wireRecorder{t: t, up: newScanner(markers), down: newScanner(markers)}
	t.Cleanup(r.wg.Wait)
	return r
}

// dial is the source agent's data-plane dialer.
func (r *wireRecorder) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	r.conns.Add(1)
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r.wg.Go(func() {
		defer ln.Close()
		in, err := ln.Accept()
		if err != nil {
			return
		}
		ln.Close()
		var d net.Dialer
		out, err := d.DialContext(context.WithoutCancel(ctx), network, addr)
		if err != nil {
			in.Close()
			return
		}
		_, _ = libvirt.Splice(context.Background(), &tapConn{Conn: in, w: r.up}, &tapConn{Conn: out, w: r.down})
	})
	var d net.Dialer
	return d.DialContext(ctx, "tcp", ln.Addr().String())
}

// tapConn copies what is read from it to w. It embeds the net.Conn interface, not the
// *net.TCPConn, so that io.Copy cannot bypass Read with the connection's WriteTo.
type tapConn struct {
	net.Conn
	w io.Writer
}

func (c *tapConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.w.Write(p[:n])
	}
	return n, err
}

func (c *tapConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

// checkCiphertext checks that the recorded traffic is ciphertext: at least the guest's
// memory went by, none of the plaintext markers did, and a sample does not compress.
func (r *wireRecorder) checkCiphertext(t testing.TB, atLeast int64) {
	t.Helper()
	if got := r.up.n.Load(); got < atLeast {
		t.Errorf("the relay carried %d bytes from the source; want at least %d", got, atLeast)
	}
	if seen := append(r.up.seen(), r.down.seen()...); len(seen) > 0 {
		t.Errorf("plaintext of the migration stream on the wire: %s", strings.Join(seen, ", "))
	}
	if ratio := r.up.compressRatio(); ratio < 0.99 {
		t.Errorf("the stream from the source compresses to %.2f of its size: not ciphertext", ratio)
	}
	t.Logf("wire: %d MiB from the source, %d KiB back, no plaintext marker, sample compresses to %.3f",
		r.up.n.Load()>>20, r.down.n.Load()>>10, r.up.compressRatio())
}

// TestLibvirtLetheMigration live-migrates the memtest86+ guest from A to B through Lethe:
// on QEMU's single migration stream, and with two multifd channels, each carried on a
// data-plane connection of its own beside the main one.
func TestLibvirtLetheMigration(t *testing.T) {
	for _, parallel := range []int{0, 2} {
		name := "single"
		if parallel > 0 {
			name = "multifd"
		}
		t.Run(name, func(t *testing.T) {
			e := newLetheEnv(t)
			tb := newTestbed(t, "lethe-memtest-lethe-"+name, withGuestMetadata)
			rec := newWireRecorder(t, multifdMagic)
			settings := benchSettings
			settings.Parallel = parallel
			e.startAgent(hostA, settings, rec.dial)
			e.startAgent(hostB, settings, nil)
			e.adopt(hostA)

			start := time.Now()
			m := e.migrate(hostB)
			took := time.Since(start)
			if m.Phase != broker.PhaseErased {
				t.Fatalf("phase %s (reason %q, notes %q), want Erased", m.Phase, m.AbortReason, m.Notes)
			}
			stats, err := tb.b.JobStats(t.Context(), tb.domain, true)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("through Lethe: %v from request to erasure, downtime %v, %d MiB, %d iterations",
				took, stats.Downtime, stats.DataProcessed>>20, stats.Iteration)
			tb.checkRunsOn(t, hostB)
			rec.checkCiphertext(t, int64(stats.DataProcessed))
			if got, want := rec.conns.Load(), int32(1+parallel); got != want {
				t.Errorf("the source opened %d data-plane connections, want %d", got, want)
			}

			rc := e.receipt(m.ID)
			if rc.Outcome != receipt.OutcomeErased {
				t.Errorf("receipt outcome %s, want erased", rc.Outcome)
			}
			epoch1, epoch2 := "lethe-demo-memtest-e1", "lethe-demo-memtest-e2"
			want := map[string]bool{"lethe-mig-" + m.ID: false, epoch1: false, epoch2: true}
			if diff := cmp.Diff(want, e.transitKeys("lethe-mig-"+m.ID, epoch1, epoch2)); diff != "" {
				t.Errorf("Vault keys (-want +got):\n%s", diff)
			}
			e.waitGuest(hostB, true)
			e.waitGuest(hostA, false)
		})
	}
}

// TestLibvirtLethePostCopy moves the memtest86+ guest under a downtime limit it cannot meet
// (1 ms, no auto-converge), for a tenant whose policy allows post-copy and agents whose
// operator does: after the first pre-copy pass the source switches to post-copy, the guest
// runs at the destination while the pages it touches are fetched from the source over
// QEMU's return path (both ways through the agents' stream), and the migration ends
// erased with the guest's memory intact.
func TestLibvirtLethePostCopy(t *testing.T) {
	e := newLetheEnvWith(t, strings.Replace(letheLibvirtPolicy, "  erasure:\n", "  transport:\n    allowPostCopy: true\n  erasure:\n", 1))
	e.postCopyAfter = 1
	tb := newTestbed(t, "lethe-memtest-postcopy", withGuestMetadata)
	settings := libvirt.Settings{MaxDowntime: time.Millisecond, PostCopy: true}
	e.startAgent(hostA, settings, nil)
	e.startAgent(hostB, settings, nil)
	e.adopt(hostA)

	m := e.migrate(hostB)
	if m.Phase != broker.PhaseErased {
		t.Fatalf("phase %s (reason %q, notes %q), want Erased", m.Phase, m.AbortReason, m.Notes)
	}
	if m.Progress == nil || !m.Progress.PostCopy {
		t.Errorf("the migration's record does not say it switched to post-copy: progress %+v", m.Progress)
	}
	stats, err := tb.b.JobStats(t.Context(), tb.domain, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("through Lethe in post-copy: downtime %v, %d MiB, %d iterations", stats.Downtime, stats.DataProcessed>>20, stats.Iteration)
	tb.checkRunsOn(t, hostB)
}

// TestLibvirtLetheLinuxMigration live-migrates the 1 GiB Linux guest through Lethe, from A
// to B and back LETHE_LIBVIRT_ROUNDS times (default 1), with LETHE_LIBVIRT_LOAD goroutines
// (default 0) spinning beside it. After each migration the guest must go on where it was and
// find, in two whole sweeps at the destination, every page of its region as it last wrote it:
// a page lost or carried stale by the dirty tracking or by the agents' tunnel is a bad page.
func TestLibvirtLetheLinuxMigration(t *testing.T) {
	e := newLetheEnv(t)
	e.vm = letheLinuxVM
	tb := newLinuxTestbed(t, "lethe-linux-lethe", ciLinuxGuest, withLinuxMetadata)
	rec := newWireRecorder(t)
	e.startAgent(hostA, benchSettings, rec.dial)
	e.startAgent(hostB, benchSettings, rec.dial)
	e.adopt(hostA)
	loadCPU(t, envInt("LETHE_LIBVIRT_LOAD", 0))

	hosts := [2]string{hostA, hostB}
	conns := [2]*libvirt.Conn{tb.a, tb.b}
	for i := range 2 * envInt("LETHE_LIBVIRT_ROUNDS", 1) {
		to := 1 - i%2
		start := time.Now()
		m := e.migrate(hosts[to])
		took := time.Since(start)
		if m.Phase != broker.PhaseErased {
			t.Fatalf("migration %d: phase %s (reason %q, notes %q), want Erased", i+1, m.Phase, m.AbortReason, m.Notes)
		}
		stats, err := conns[to].JobStats(t.Context(), tb.domain, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("migration %d to %s through Lethe: %v from request to erasure, downtime %v, %d MiB, %d iterations",
			i+1, hosts[to], took, stats.Downtime, stats.DataProcessed>>20, stats.Iteration)
		tb.checkRunsOn(t, hosts[to])
		e.waitGuest(hosts[to], true)
		e.waitGuest(hosts[1-to], false)
	}
	rec.checkCiphertext(t, int64(ciLinuxGuest.RegionMiB)<<20)
}

// TestLibvirtLetheDestinationStopped stops the destination agent mid-stream: libvirt's job
// fails, the guest keeps running on A, B keeps no domain, the keys of the migration and of
// the destination's epoch are destroyed, and the receipt says aborted.
func TestLibvirtLetheDestinationStopped(t *testing.T) {
	e := newLetheEnv(t)
	tb := newTestbed(t, "lethe-memtest-stopped", withGuestMetadata)
	rec := newWireRecorder(t)
	// Slow enough that the stream is still running when the destination stops.
	slow := libvirt.Settings{Bandwidth: 32}
	e.startAgent(hostA, slow, rec.dial)
	b := e.startAgent(hostB, slow, nil)
	e.adopt(hostA)

	resp, err := e.tenant.CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: letheVM, Destination: hostB})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	waitFor(t, letheWait, "16 MiB on the wire", func() (bool, error) { return rec.up.n.Load() >= 16<<20, nil })
	b.stop(t)
	t.Logf("destination agent stopped after %d MiB", rec.up.n.Load()>>20)

	m := e.waitEnd(id)
	if m.Phase != broker.PhaseAborted {
		t.Fatalf("phase %s, want Aborted", m.Phase)
	}
	t.Logf("abort reason: %s; notes %q", m.AbortReason, m.Notes)
	if job, err := tb.a.JobStats(t.Context(), tb.domain, true); err == nil {
		t.Logf("source's last job: %s %q", job.Job, job.Error)
		if job.Job == libvirt.JobCompleted {
			t.Errorf("the source's migration job completed")
		}
	}
	tb.checkRunsOn(t, hostA)
	want := map[string]bool{"lethe-mig-" + id: false, "lethe-demo-memtest-e2": false, "lethe-demo-memtest-e1": true}
	if diff := cmp.Diff(want, e.transitKeys("lethe-mig-"+id, "lethe-demo-memtest-e2", "lethe-demo-memtest-e1")); diff != "" {
		t.Errorf("Vault keys (-want +got):\n%s", diff)
	}
	// The stopped destination cannot attest that it erased and never resumed the guest.
	if rc := e.receipt(id); rc.Outcome != receipt.OutcomeAbortedUnverifiedErasure {
		t.Errorf("receipt outcome %s, want %s", rc.Outcome, receipt.OutcomeAbortedUnverifiedErasure)
	}
	rec.checkCiphertext(t, 16<<20)
	e.waitGuest(hostA, true)
}

// migrateLethe is the benchmark's Lethe mode: one migration through the broker.
func migrateLethe(b *testing.B, e *letheEnv, to string) {
	m := e.migrate(to)
	if m.Phase != broker.PhaseErased {
		b.Fatalf("phase %s (reason %q, notes %q), want Erased", m.Phase, m.AbortReason, m.Notes)
	}
}

// startLetheBenchWith sets up Lethe for a benchmark of the guest vm: both agents, migrating
// with settings, and the guest adopted on A.
func startLetheBenchWith(b *testing.B, vm string, settings libvirt.Settings) *letheEnv {
	e := newLetheEnv(b)
	e.vm = vm
	e.startAgent(hostA, settings, nil)
	e.startAgent(hostB, settings, nil)
	e.adopt(hostA)
	return e
}
