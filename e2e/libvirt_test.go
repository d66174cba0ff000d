//go:build libvirt

package e2e

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/lethe-cc/lethe/migagent/libvirt"
)

// The two libvirt hosts that scripts/libvirt-hosts.sh starts.
const (
	hostA = "lethe-a"
	hostB = "lethe-b"
)

// stateDir is the script's state directory: per-host sockets, logs and migration endpoints.
func stateDir() string {
	return cmp.Or(os.Getenv("LETHE_LIBVIRT_STATE"), "/var/tmp/lethe-libvirt")
}

func socketOf(host string) string { return filepath.Join(stateDir(), host, "libvirt-sock") }

// serialLogOf is where, seen from this (root) mount namespace, the guest's serial log lands
// on host: the domain XML names /var/log/libvirt/qemu/…, which each host bind-mounts from
// its own directory.
func serialLogOf(host, domain string) string {
	return filepath.Join(stateDir(), host, "log", "qemu", domain+".serial.log")
}

// migrateSocketOf is a unix socket path for a migration endpoint on host, the same inside the
// host's mount namespace and here.
func migrateSocketOf(host, name string) string {
	return filepath.Join(stateDir(), host, "migrate", name+".sock")
}

// testbed is the two hosts and a guest running on one of them: memtest86+, or the Linux
// guest (linuxGuest).
type testbed struct {
	a, b   *libvirt.Conn
	domain string
	linux  bool
}

func dialHost(t testing.TB, host string) *libvirt.Conn {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("host", host)
	c, err := libvirt.Dial(t.Context(), libvirt.Config{Socket: socketOf(host), Logger: log})
	if err != nil {
		t.Fatalf("dialing %s (is `scripts/libvirt-hosts.sh up` done?): %v", host, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newTestbed connects to both hosts, removes what an earlier run may have left, and starts
// the memtest86+ guest called domain on host A, its configuration changed by opts; it returns
// once memtest is testing.
func newTestbed(t testing.TB, domain string, opts ...func(*libvirt.GuestConfig)) *testbed {
	t.Helper()
	tb := startTestbed(t, domain, opts...)
	// Wait until memtest has been rewriting memory for a couple of seconds of its own time.
	waitFor(t, 60*time.Second, "memtest86+ testing on "+hostA, func() (bool, error) {
		st := memtestStatus(t, hostA, domain)
		return st.Seen && st.Elapsed >= 2*time.Second, nil
	})
	return tb
}

// newLinuxTestbed is newTestbed with the Linux guest g; it returns once the guest has written
// its region and is rewriting it.
func newLinuxTestbed(t testing.TB, domain string, g linuxGuest, opts ...func(*libvirt.GuestConfig)) *testbed {
	t.Helper()
	tb := startTestbed(t, domain, append([]func(*libvirt.GuestConfig){g.config(t)}, opts...)...)
	tb.linux = true
	waitLinuxReady(t, hostA, domain)
	return tb
}

func startTestbed(t testing.TB, domain string, opts ...func(*libvirt.GuestConfig)) *testbed {
	t.Helper()
	tb := &testbed{a: dialHost(t, hostA), b: dialHost(t, hostB), domain: domain}
	ctx := t.Context()
	tb.removeAll(t)
	t.Cleanup(func() { tb.removeAll(t) })

	cfg := libvirt.GuestConfig{
		Name:      domain,
		SerialLog: "/var/log/libvirt/qemu/" + domain + ".serial.log",
	}
	for _, o := range opts {
		o(&cfg)
	}
	domXML, err := libvirt.GuestXML(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.a.Define(ctx, domXML); err != nil {
		t.Fatal(err)
	}
	if err := tb.a.Start(ctx, domain); err != nil {
		t.Fatal(err)
	}
	return tb
}

func (tb *testbed) removeAll(t testing.TB) {
	ctx := context.WithoutCancel(t.Context())
	for host, c := range map[string]*libvirt.Conn{hostA: tb.a, hostB: tb.b} {
		if err := c.Remove(ctx, tb.domain); err != nil {
			t.Errorf("removing %s on %s: %v", tb.domain, host, err)
		}
		os.Remove(serialLogOf(host, tb.domain))
	}
}

func memtestStatus(t testing.TB, host, domain string) libvirt.MemtestStatus {
	t.Helper()
	b, err := os.ReadFile(serialLogOf(host, domain))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return libvirt.ParseMemtestSerial(b)
}

// checkRunsOn checks that the guest runs on host, is gone from (or never reached) other,
// and that its memtest keeps counting on host with no memory errors: its clock goes on from
// where it was on other (a guest that restarted would count from zero again).
//
// For the Linux guest it is checkLinuxRunsOn.
func (tb *testbed) checkRunsOn(t testing.TB, host string) {
	t.Helper()
	if tb.linux {
		tb.checkLinuxRunsOn(t, host)
		return
	}
	other := tb.checkPlacement(t, host)
	// The log on host may also hold the output of an earlier visit, and the guest prints its
	// screen a character at a time, so a migration can cut a line between two hosts' logs:
	// read only what this host's hypervisor writes from now on.
	path := serialLogOf(host, tb.domain)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	from := fi.Size()
	status := func() libvirt.MemtestStatus {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return libvirt.ParseMemtestSerial(b[min(from, int64(len(b))):])
	}
	check := func(st libvirt.MemtestStatus) error {
		if st.Errors == 0 {
			return nil
		}
		kept := filepath.Join(os.TempDir(), tb.domain+"-"+host+".serial.log")
		if b, err := os.ReadFile(path); err == nil {
			os.WriteFile(kept, b[from:], 0o600)
		}
		return fmt.Errorf("memtest86+ on %s reports %d memory errors (serial log kept at %s)", host, st.Errors, kept)
	}
	var first libvirt.MemtestStatus
	waitFor(t, 30*time.Second, "memtest86+ output on "+host, func() (bool, error) {
		first = status()
		return first.Seen, check(first)
	})
	// The log on other ends with what the guest showed there last (memtest's clock counts
	// with the guest's time, which stands still while it is paused for the cutover).
	if b, err := os.ReadFile(serialLogOf(other, tb.domain)); err == nil {
		if before := libvirt.ParseMemtestSerial(b); before.Seen && first.Elapsed+time.Second < before.Elapsed {
			t.Fatalf("memtest86+ on %s counts from %v, but it was at %v on %s: the guest restarted", host, first.Elapsed, before.Elapsed, other)
		}
	}
	var last libvirt.MemtestStatus
	waitFor(t, 30*time.Second, "memtest86+ counting on "+host, func() (bool, error) {
		last = status()
		return last.Elapsed >= first.Elapsed+2*time.Second, check(last)
	})
	t.Logf("memtest86+ on %s: time %v → %v, pass %d, errors %d", host, first.Elapsed, last.Elapsed, last.Pass, last.Errors)
}

// checkPlacement checks that the guest runs on host and is gone from (or never reached) the
// other host, which it returns.
func (tb *testbed) checkPlacement(t testing.TB, host string) string {
	t.Helper()
	ctx := t.Context()
	on, off, other := tb.a, tb.b, hostB
	if host == hostB {
		on, off, other = tb.b, tb.a, hostA
	}
	st, err := on.State(ctx, tb.domain)
	if err != nil || st != libvirt.StateRunning {
		t.Fatalf("%s on %s: state %v, %v; want running", tb.domain, host, st, err)
	}
	if _, err := off.State(ctx, tb.domain); !errors.Is(err, libvirt.ErrDomainNotFound) {
		t.Fatalf("%s on %s: %v; want %v", tb.domain, other, err, libvirt.ErrDomainNotFound)
	}
	doms, err := off.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range doms {
		if d.Name == tb.domain {
			t.Fatalf("%s still listed on %s: %+v", tb.domain, other, d)
		}
	}
	return other
}

// migrateDirect is the baseline: a managed peer-to-peer migration from A's libvirtd straight
// to B's, the stream over the veth between the hosts' network namespaces (B's qemu.conf
// migration_host names B's address there). No Lethe code carries anything.
func migrateDirect(t testing.TB, from, to, domain string) time.Duration {
	t.Helper()
	return migrateDirectWith(t, from, to, domain, benchSettings)
}

// migrateDirectWith is migrateDirect with the downtime limit, bandwidth and auto-converge of
// settings.
func migrateDirectWith(t testing.TB, from, to, domain string, settings libvirt.Settings) time.Duration {
	t.Helper()
	l := golibvirt.NewWithDialer(unixDialer(socketOf(from)))
	if err := l.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		t.Fatal(err)
	}
	defer l.Disconnect()
	dom, err := l.DomainLookupByName(domain)
	if err != nil {
		t.Fatal(err)
	}
	dconn := "qemu+unix:///system?socket=" + socketOf(to)
	flags := golibvirt.MigrateLive | golibvirt.MigratePeer2peer | golibvirt.MigratePersistDest | golibvirt.MigrateUndefineSource
	if settings.AutoConverge {
		flags |= golibvirt.MigrateAutoConverge
	}
	var params []golibvirt.TypedParam
	if settings.Parallel > 0 {
		flags |= golibvirt.MigrateParallel
		params = append(params, golibvirt.TypedParam{Field: golibvirt.MigrateParamParallelConnections, Value: *golibvirt.NewTypedParamValueInt(int32(settings.Parallel))})
	}
	if err := l.DomainMigrateSetMaxDowntime(dom, uint64(settings.MaxDowntime.Milliseconds()), 0); err != nil {
		t.Fatal(err)
	}
	if settings.Bandwidth > 0 {
		if err := l.DomainMigrateSetMaxSpeed(dom, settings.Bandwidth, 0); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	if _, err := l.DomainMigratePerform3Params(dom, golibvirt.OptString{dconn}, params, nil, flags); err != nil {
		t.Fatalf("migrating %s directly from %s to %s: %v", domain, from, to, err)
	}
	return time.Since(start)
}

// benchSettings are the settings of every migration here, the direct one included: QEMU's
// default downtime limit, and auto-converge for a guest that rewrites memory without pause.
// QEMU 7.2 under TCG has shown memtest86+ errors on the destination (block-move test, the
// found value the complement of the expected one: a page the dirty bitmap missed) after
// migrations that ran many pre-copy iterations, in direct libvirt-to-libvirt migrations too.
// A 2 s downtime limit converges in about three iterations, where those errors were not seen.
var benchSettings = libvirt.Settings{MaxDowntime: 2 * time.Second, AutoConverge: true}

type unixDialer string

func (d unixDialer) Dial() (net.Conn, error) { return net.Dial("unix", string(d)) }

// libvirtRelay stands in for the two agents: a "source agent" accepts the source hypervisor's
// stream on a unix socket on the source host, carries it over plain TCP on loopback to a
// "destination agent", which dials the destination hypervisor's unix socket. Each side
// splices its two connections, half-close passed on. The encrypted transport takes the
// TCP hop's place in the agents.
type libvirtRelay struct {
	send    libvirt.Endpoint // where the source hypervisor sends
	receive libvirt.Endpoint // where the destination hypervisor listens
	srcLn   *libvirt.Listener
	tcpLn   net.Listener
	cancel  context.CancelFunc
	killAt  int64 // bytes from the source after which the relay dies; 0 means never
	carried atomic.Int64
	plain   *scanner // what the source hypervisor sent, scanned for plaintext markers
	wg      sync.WaitGroup
	err     error // first error of either side, after wait
	errOnce sync.Once
}

func startLibvirtRelay(t testing.TB, from, to, name string, killAt int64) *libvirtRelay {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	r := &libvirtRelay{
		send:    libvirt.UnixEndpoint(migrateSocketOf(from, name)),
		receive: libvirt.UnixEndpoint(migrateSocketOf(to, name)),
		cancel:  cancel,
		killAt:  killAt,
		plain:   newScanner(plaintextMarkers),
	}
	os.Remove(r.receive.Address) // a stale socket would stop the destination from listening
	var err error
	if r.srcLn, err = libvirt.ListenEndpoint(ctx, r.send); err != nil {
		t.Fatal(err)
	}
	var lc net.ListenConfig
	if r.tcpLn, err = lc.Listen(ctx, "tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	r.wg.Add(2)
	go r.sourceAgent(ctx)
	go r.destinationAgent(ctx)
	t.Cleanup(func() { r.stop() })
	return r
}

func (r *libvirtRelay) fail(err error) {
	if err != nil {
		r.errOnce.Do(func() { r.err = err })
	}
}

func (r *libvirtRelay) sourceAgent(ctx context.Context) {
	defer r.wg.Done()
	defer r.srcLn.Close()
	hv, err := r.srcLn.Accept(ctx)
	if err != nil {
		r.fail(err)
		return
	}
	var d net.Dialer
	peer, err := d.DialContext(ctx, "tcp", r.tcpLn.Addr().String())
	if err != nil {
		hv.Close()
		r.fail(err)
		return
	}
	_, err = libvirt.Splice(ctx, &killer{Conn: hv, r: r}, peer)
	r.fail(err)
}

func (r *libvirtRelay) destinationAgent(ctx context.Context) {
	defer r.wg.Done()
	stop := context.AfterFunc(ctx, func() { r.tcpLn.Close() })
	defer stop()
	peer, err := r.tcpLn.Accept()
	r.tcpLn.Close()
	if err != nil {
		r.fail(err)
		return
	}
	hv, err := libvirt.DialEndpoint(ctx, r.receive)
	if err != nil {
		peer.Close()
		r.fail(err)
		return
	}
	_, err = libvirt.Splice(ctx, peer, hv)
	r.fail(err)
}

// stop kills the relay and waits for both sides.
func (r *libvirtRelay) stop() error {
	r.cancel()
	r.wg.Wait()
	return r.err
}

// drain waits up to timeout for both sides to end by themselves (both hypervisors closed
// their connections), then stops the relay.
func (r *libvirtRelay) drain(timeout time.Duration) error {
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
	return r.stop()
}

// killer counts what the source hypervisor sends and kills the whole relay once killAt bytes
// have passed, as if both agents died mid-stream.
type killer struct {
	net.Conn
	r *libvirtRelay
}

func (k *killer) Read(p []byte) (int, error) {
	n, err := k.Conn.Read(p)
	k.r.plain.Write(p[:n])
	if total := k.r.carried.Add(int64(n)); k.r.killAt > 0 && total >= k.r.killAt {
		k.r.cancel()
		return n, errors.New("relay killed")
	}
	return n, err
}

func (k *killer) CloseWrite() error { return k.Conn.(interface{ CloseWrite() error }).CloseWrite() }

func logProgress(t testing.TB) func(libvirt.Progress) {
	return func(p libvirt.Progress) {
		t.Logf("progress: %s iteration %d, %d/%d MiB processed, %d MiB remaining, dirty %d pages/s, throttle %d%%",
			p.Job, p.Iteration, p.DataProcessed>>20, p.DataTotal>>20, p.DataRemaining>>20, p.DirtyRate, p.AutoConvergeThrottle)
	}
}

func migrateRelayed(t testing.TB, tb *testbed, from, to *libvirt.Conn, fromHost, toHost string, killAt int64) (libvirt.MigrateResult, *libvirtRelay, error) {
	t.Helper()
	r := startLibvirtRelay(t, fromHost, toHost, tb.domain, killAt)
	res, err := libvirt.Migrate(t.Context(), libvirt.MigrateConfig{
		Source:      from,
		Destination: to,
		Domain:      tb.domain,
		Settings:    benchSettings,
		Send:        r.send,
		Receive:     r.receive,
		Progress:    logProgress(t),
		// Often enough to see a few rounds of a migration that takes about a second.
		ProgressInterval: 200 * time.Millisecond,
	})
	if err != nil {
		r.stop()
	} else {
		r.drain(10 * time.Second)
	}
	return res, r, err
}

func TestLibvirtHosts(t *testing.T) {
	ctx := t.Context()
	a, b := dialHost(t, hostA), dialHost(t, hostB)
	ha, err := a.Host(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hb, err := b.Host(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ha.UUID == "" || ha.UUID == hb.UUID {
		t.Fatalf("host UUIDs %q and %q: want distinct", ha.UUID, hb.UUID)
	}
	if ha.Arch != "x86_64" || !strings.Contains(strings.Join(ha.DomainTypes, ","), "qemu") {
		t.Fatalf("host A: arch %q, domain types %v; want x86_64 with qemu", ha.Arch, ha.DomainTypes)
	}
	t.Logf("A: %s uuid %s libvirt %d qemu %d types %v", ha.Hostname, ha.UUID, ha.LibvirtVersion, ha.HypervisorVersion, ha.DomainTypes)
}

// TestLibvirtDirectMigration is the baseline: libvirt to libvirt, no Lethe in the path.
func TestLibvirtDirectMigration(t *testing.T) {
	tb := newTestbed(t, "lethe-memtest-direct")
	took := migrateDirect(t, hostA, hostB, tb.domain)
	stats, err := tb.b.JobStats(t.Context(), tb.domain, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("direct: %v, downtime %v, %d MiB, %d iterations", took, stats.Downtime, stats.DataProcessed>>20, stats.Iteration)
	tb.checkRunsOn(t, hostB)
}

// TestLibvirtRelayedMigration drives the migration step by step, the stream carried between
// the hosts by a relay in the agents' place.
func TestLibvirtRelayedMigration(t *testing.T) {
	tb := newTestbed(t, "lethe-memtest-relayed")
	res, r, err := migrateRelayed(t, tb, tb.a, tb.b, hostA, hostB, 0)
	if err != nil {
		t.Fatalf("migrating through the relay: %v (relay: %v)", err, r.err)
	}
	if r.err != nil {
		t.Fatalf("relay: %v", r.err)
	}
	if got := r.carried.Load(); got < int64(res.Stats.DataProcessed) || got < 128<<20 {
		t.Fatalf("relay carried %d bytes; libvirt processed %d: want at least that and the guest's 128 MiB", got, res.Stats.DataProcessed)
	}
	t.Logf("relayed: %v, downtime %v, %d MiB processed, %d MiB carried, %d iterations",
		res.Elapsed, res.Stats.Downtime, res.Stats.DataProcessed>>20, r.carried.Load()>>20, res.Stats.Iteration)
	// The positive control of the Lethe test's wire check: the plaintext stream holds every
	// marker that the ciphertext must not.
	if seen := r.plain.seen(); len(seen) != len(plaintextMarkers) {
		t.Errorf("plaintext stream holds markers %v; want all %d", seen, len(plaintextMarkers))
	}
	tb.checkRunsOn(t, hostB)
}

// TestLibvirtRelayKilledMidStream kills the relay after 16 MiB: the job fails, the guest
// keeps running on A, and B keeps no domain.
func TestLibvirtRelayKilledMidStream(t *testing.T) {
	tb := newTestbed(t, "lethe-memtest-killed")
	_, r, err := migrateRelayed(t, tb, tb.a, tb.b, hostA, hostB, 16<<20)
	if err == nil {
		t.Fatal("migration through a killed relay succeeded")
	}
	t.Logf("migration failed as it should: %v (relay carried %d MiB)", err, r.carried.Load()>>20)
	if errors.Is(err, libvirt.ErrNotRunning) || errors.Is(err, libvirt.ErrStillRunning) {
		t.Fatalf("cancelling left the guest in the wrong place: %v", err)
	}
	tb.checkRunsOn(t, hostA)
}

// TestLibvirtMigrationCancelled cancels the migration's context mid-stream, as an agent does
// on abort: the job is aborted, the guest keeps running on A, and B keeps no domain.
func TestLibvirtMigrationCancelled(t *testing.T) {
	tb := newTestbed(t, "lethe-memtest-cancelled")
	r := startLibvirtRelay(t, hostA, hostB, tb.domain, 0)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	_, err := libvirt.Migrate(ctx, libvirt.MigrateConfig{
		Source:      tb.a,
		Destination: tb.b,
		Domain:      tb.domain,
		// Slow enough that the migration is still running when it is cancelled.
		Settings: libvirt.Settings{Bandwidth: 32},
		Send:     r.send,
		Receive:  r.receive,
		Progress: func(p libvirt.Progress) {
			if p.DataProcessed >= 8<<20 {
				cancel()
			}
		},
		ProgressInterval: 100 * time.Millisecond,
	})
	r.stop()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled migration: %v; want %v", err, context.Canceled)
	}
	t.Logf("migration cancelled: %v (relay carried %d MiB)", err, r.carried.Load()>>20)
	tb.checkRunsOn(t, hostA)
}

// BenchmarkLibvirtMigration moves the memtest86+ guest back and forth between the hosts,
// at a 2 s downtime limit:
//   - direct: libvirt peer-to-peer, QEMU to QEMU over TCP between the namespaces (no Lethe);
//   - steps: the step-by-step protocol, QEMU to QEMU over one unix socket (no relay);
//   - relayed: the step-by-step protocol through the test relay (unix → TCP → unix);
//   - lethe: through Lethe (broker, keybroker, Vault, agents), the stream encrypted between
//     the agents; its wall time runs from the request to the erasure receipt;
//
// and, direct and through Lethe, at a 300 ms and a 1 s limit (downtime=…/direct|lethe),
// where QEMU under TCG runs more pre-copy iterations and has shown memory errors in the
// guest with or without Lethe in the path (README, Not done yet): there the errors memtest86+
// reports after the last migration are a metric (memtest-errors), not a failure.
//
// It reports wall time, downtime and bytes per migration.
func BenchmarkLibvirtMigration(b *testing.B) {
	type mode struct {
		name  string
		limit time.Duration // zero: benchSettings, errors fail
	}
	modes := []mode{{"direct", 0}, {"steps", 0}, {"relayed", 0}, {"lethe", 0}}
	for _, limit := range []time.Duration{300 * time.Millisecond, time.Second} {
		modes = append(modes, mode{"direct", limit}, mode{"lethe", limit})
	}
	for _, md := range modes {
		name, settings := md.name, benchSettings
		if md.limit > 0 {
			name = fmt.Sprintf("downtime=%v/%s", md.limit, md.name)
			settings.MaxDowntime = md.limit
		}
		b.Run(name, func(b *testing.B) {
			var opts []func(*libvirt.GuestConfig)
			if md.name == "lethe" {
				opts = append(opts, withGuestMetadata)
			}
			qmp := recordQMP(b, hostA, hostB)
			tb := newTestbed(b, "lethe-memtest-bench-"+strings.NewReplacer("=", "-", "/", "-").Replace(name), opts...)
			var e *letheEnv
			if md.name == "lethe" {
				e = startLetheBenchWith(b, letheVM, settings)
				b.ResetTimer()
			}
			hosts := [2]string{hostA, hostB}
			conns := [2]*libvirt.Conn{tb.a, tb.b}
			var wall, down time.Duration
			var pause cutover
			var bytes uint64
			for i := range b.N {
				from, to := i%2, 1-i%2
				start := time.Now()
				switch md.name {
				case "direct":
					migrateDirectWith(b, hosts[from], hosts[to], tb.domain, settings)
				case "steps":
					ep := libvirt.UnixEndpoint(migrateSocketOf(hosts[to], tb.domain))
					os.Remove(ep.Address)
					if _, err := libvirt.Migrate(b.Context(), libvirt.MigrateConfig{
						Source: conns[from], Destination: conns[to], Domain: tb.domain,
						Settings: benchSettings,
						Send:     ep, Receive: ep,
					}); err != nil {
						b.Fatal(err)
					}
				case "relayed":
					if _, _, err := migrateRelayed(b, tb, conns[from], conns[to], hosts[from], hosts[to], 0); err != nil {
						b.Fatal(err)
					}
				case "lethe":
					migrateLethe(b, e, hosts[to])
				}
				wall += time.Since(start)
				st, err := conns[to].JobStats(b.Context(), tb.domain, true)
				if err != nil {
					b.Fatal(err)
				}
				down += st.Downtime
				bytes += st.DataProcessed
				c := qmp.cutover(b, tb.domain, hosts[from], hosts[to], start)
				pause = pause.add(c)
				b.Logf("migration %d to %s: %v, downtime %v (%v), %d MiB, %d iterations", i+1, hosts[to], time.Since(start), st.Downtime, c, st.DataProcessed>>20, st.Iteration)
			}
			b.ReportMetric(float64(wall.Milliseconds())/float64(b.N), "wall-ms/op")
			b.ReportMetric(float64(down.Milliseconds())/float64(b.N), "downtime-ms/op")
			pause.report(b)
			b.ReportMetric(float64(bytes>>20)/float64(b.N), "MiB/op")
			b.SetBytes(int64(bytes) / int64(b.N))
			final := hosts[b.N%2]
			b.StopTimer()
			if md.limit == 0 {
				tb.checkRunsOn(b, final)
				return
			}
			b.ReportMetric(float64(memtestErrors(b, tb, final)), "memtest-errors")
		})
	}
}

// memtestErrors waits until memtest86+ has counted two seconds on host after the guest
// arrived there, and returns the memory errors it reports then.
func memtestErrors(t testing.TB, tb *testbed, host string) int {
	t.Helper()
	tb.checkPlacement(t, host)
	path := serialLogOf(host, tb.domain)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	status := func() libvirt.MemtestStatus {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return libvirt.ParseMemtestSerial(b[min(fi.Size(), int64(len(b))):])
	}
	var first, last libvirt.MemtestStatus
	waitFor(t, 30*time.Second, "memtest86+ output on "+host, func() (bool, error) {
		first = status()
		return first.Seen, nil
	})
	waitFor(t, 30*time.Second, "memtest86+ counting on "+host, func() (bool, error) {
		last = status()
		return last.Elapsed >= first.Elapsed+2*time.Second, nil
	})
	return last.Errors
}

// waitFor polls cond until it holds, fails, or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: not within %v", what, timeout)
		case <-tick.C:
		}
	}
}

// testWriter sends log output to the test's log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var _ io.Writer = testWriter{}
