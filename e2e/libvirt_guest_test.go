//go:build libvirt

package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/migagent/libvirt"
)

// linuxGuest is the Linux guest of the libvirt tests: Debian's kernel (installed by
// scripts/libvirt-hosts.sh), booted directly, with an initramfs whose only program is
// e2e/guestload. The program rewrites Rate pages a second of a RegionMiB region and checks
// every page of it against what it last wrote, over and over; see its doc.
type linuxGuest struct {
	// MemoryMiB is the guest's memory.
	MemoryMiB int
	// RegionMiB is how much of it the program writes and checks.
	RegionMiB int
	// Rate is the pages (4 KiB) it rewrites a second.
	Rate int
}

// ciLinuxGuest is the guest of the tests: 1 GiB, three quarters of it written and checked,
// 16 MiB/s rewritten.
var ciLinuxGuest = linuxGuest{MemoryMiB: 1024, RegionMiB: 768, Rate: 4096}

// linuxKernel is the newest of Debian's kernels in /boot.
func linuxKernel(t testing.TB) string {
	t.Helper()
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(ks) == 0 {
		t.Fatal("no /boot/vmlinuz-*: run `scripts/libvirt-hosts.sh install` (it installs linux-image-amd64)")
	}
	slices.Sort(ks)
	return ks[len(ks)-1]
}

var initramfs struct {
	once sync.Once
	path string
	err  error
}

// guestInitramfs builds e2e/guestload for the guest and packs it as /init of an initramfs,
// once per test binary, in the state directory both hosts see.
func guestInitramfs(t testing.TB) string {
	t.Helper()
	initramfs.once.Do(func() {
		initramfs.path, initramfs.err = buildInitramfs(t.Context(), filepath.Join(stateDir(), "guest"))
	})
	if initramfs.err != nil {
		t.Fatal(initramfs.err)
	}
	return initramfs.path
}

func buildInitramfs(ctx context.Context, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "init")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./guestload")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the guest's init: %w\n%s", err, out)
	}
	prog, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	w := cpioWriter{w: &b}
	w.dir("dev")
	w.charDev("dev/console", 5, 1)
	w.dir("proc")
	w.dir("sys")
	w.file("init", 0o755, prog)
	w.trailer()
	path := filepath.Join(dir, "lethe-guest.cpio")
	tmp := fmt.Sprintf("%s.%d", path, os.Getpid())
	if err := os.WriteFile(tmp, b.Bytes(), 0o644); err != nil {
		return "", err
	}
	return path, os.Rename(tmp, path)
}

// cpioWriter writes a cpio archive in the "newc" format the kernel unpacks as initramfs.
type cpioWriter struct {
	w   *bytes.Buffer
	ino int
}

const (
	cpioDir  = 0o040000
	cpioFile = 0o100000
	cpioChar = 0o020000
)

func (c *cpioWriter) entry(name string, mode, rdevMajor, rdevMinor int, data []byte) {
	c.ino++
	nlink := 1
	if mode&0o170000 == cpioDir {
		nlink = 2
	}
	fmt.Fprintf(c.w, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.w.WriteString(name)
	c.w.WriteByte(0)
	c.pad()
	c.w.Write(data)
	c.pad()
}

func (c *cpioWriter) pad() {
	for c.w.Len()%4 != 0 {
		c.w.WriteByte(0)
	}
}

func (c *cpioWriter) dir(name string) { c.entry(name, cpioDir|0o755, 0, 0, nil) }
func (c *cpioWriter) charDev(name string, major, minor int) {
	c.entry(name, cpioChar|0o600, major, minor, nil)
}
func (c *cpioWriter) file(name string, perm int, data []byte) {
	c.entry(name, cpioFile|perm, 0, 0, data)
}
func (c *cpioWriter) trailer() { c.entry("TRAILER!!!", 0, 0, 0, nil) }

// config makes cfg the Linux guest.
func (g linuxGuest) config(t testing.TB) func(*libvirt.GuestConfig) {
	kernel, initrd := linuxKernel(t), guestInitramfs(t)
	return func(cfg *libvirt.GuestConfig) {
		cfg.MemoryMiB = g.MemoryMiB
		cfg.Kernel = kernel
		cfg.Initrd = initrd
		cfg.Cmdline = fmt.Sprintf("console=ttyS0,115200 quiet panic=-1 mitigations=off nokaslr "+
			"lethe_mem_mib=%d lethe_rate=%d", g.RegionMiB, g.Rate)
	}
}

// guestStatus is what the Linux guest printed on its serial console.
type guestStatus struct {
	// Ready counts its "ready" lines: one per boot.
	Ready int
	// Writes are the page writes of its first and last "alive" lines; Alive counts them.
	FirstWrites, Writes int64
	Alive               int
	// Sweeps are its verdicts, in order.
	Sweeps []guestSweep
	// BadLines are its lines about bad pages.
	BadLines []string
}

type guestSweep struct{ Pages, Bad int }

var (
	guestReady   = regexp.MustCompile(`lethe-guest: ready pages=(\d+)`)
	guestAlive   = regexp.MustCompile(`lethe-guest: alive n=(\d+) `)
	guestVerdict = regexp.MustCompile(`lethe-guest: verified (\d+) pages, (\d+) bad`)
	guestBad     = regexp.MustCompile(`lethe-guest: (bad page [^\r\n]*|failed[^\r\n]*)`)
)

// parseGuestSerial reads the guest's serial log; only whole lines count (a migration may cut
// one between two hosts' logs).
func parseGuestSerial(b []byte) guestStatus {
	var st guestStatus
	for line := range bytes.Lines(b) {
		if !bytes.HasSuffix(line, []byte("\n")) {
			break
		}
		if guestReady.Match(line) {
			st.Ready++
		}
		if m := guestAlive.FindSubmatch(line); m != nil {
			n, _ := strconv.ParseInt(string(m[1]), 10, 64)
			if st.Alive == 0 {
				st.FirstWrites = n
			}
			st.Writes = n
			st.Alive++
		}
		if m := guestVerdict.FindSubmatch(line); m != nil {
			p, _ := strconv.Atoi(string(m[1]))
			bad, _ := strconv.Atoi(string(m[2]))
			st.Sweeps = append(st.Sweeps, guestSweep{Pages: p, Bad: bad})
		}
		if m := guestBad.FindSubmatch(line); m != nil {
			st.BadLines = append(st.BadLines, string(m[1]))
		}
	}
	return st
}

func readGuestStatus(t testing.TB, host, domain string, from int64) guestStatus {
	t.Helper()
	b, err := os.ReadFile(serialLogOf(host, domain))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return parseGuestSerial(b[min(from, int64(len(b))):])
}

// waitLinuxReady waits until the guest on host wrote its region once and is rewriting it.
func waitLinuxReady(t testing.TB, host, domain string) {
	t.Helper()
	waitFor(t, 3*time.Minute, "the Linux guest running on "+host, func() (bool, error) {
		st := readGuestStatus(t, host, domain, 0)
		if len(st.BadLines) > 0 {
			return false, fmt.Errorf("guest on %s: %s", host, st.BadLines[0])
		}
		return st.Ready > 0 && st.Alive >= 2, nil
	})
}

// checkLinuxRunsOn checks that the Linux guest goes on where it was (no new boot, its write
// counter on from where the other host's log left it) and that two whole sweeps at host,
// the second begun there, find every page as it last wrote it.
func (tb *testbed) checkLinuxRunsOn(t testing.TB, host string) {
	t.Helper()
	other := tb.checkPlacement(t, host)
	path := serialLogOf(host, tb.domain)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	from := fi.Size()
	var st guestStatus
	silent := time.Now().Add(time.Minute)
	waitFor(t, 3*time.Minute, "two verdicts of the Linux guest on "+host, func() (bool, error) {
		st = readGuestStatus(t, host, tb.domain, from)
		if st.Alive == 0 && time.Now().After(silent) {
			return false, fmt.Errorf("the Linux guest on %s has said nothing for a minute: hung (serial log kept at %s)", host, keepLog(path, from))
		}
		if len(st.BadLines) > 0 || slices.ContainsFunc(st.Sweeps, func(s guestSweep) bool { return s.Bad > 0 }) {
			return false, fmt.Errorf("guest on %s found bad pages: sweeps %+v, %q (serial log kept at %s)", host, st.Sweeps, st.BadLines, keepLog(path, from))
		}
		if st.Ready > 0 {
			return false, fmt.Errorf("the Linux guest booted again on %s (serial log kept at %s)", host, keepLog(path, from))
		}
		return len(st.Sweeps) >= 2 && st.Alive >= 2, nil
	})
	before := readGuestStatus(t, other, tb.domain, 0)
	if st.FirstWrites < before.Writes {
		t.Fatalf("the Linux guest counts %d writes on %s, but it was at %d on %s: it restarted", st.FirstWrites, host, before.Writes, other)
	}
	t.Logf("Linux guest on %s: writes %d → %d, verified %d pages %d times, 0 bad", host, st.FirstWrites, st.Writes, st.Sweeps[0].Pages, len(st.Sweeps))
}

// keepLog copies the serial log at path, from offset from, to a file that outlives the test,
// and returns its name.
func keepLog(path string, from int64) string {
	kept := filepath.Join(os.TempDir(), filepath.Base(path))
	if b, err := os.ReadFile(path); err == nil {
		os.WriteFile(kept, b[min(from, int64(len(b))):], 0o600)
	}
	return kept
}

// loadCPU keeps n goroutines spinning until the test ends: the load under which a migration's
// dirty tracking and the agents' buffers are to hold.
func loadCPU(t testing.TB, n int) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			x := uint64(1)
			for ctx.Err() == nil {
				for range 1 << 16 {
					x = x*6364136223846793005 + 1442695040888963407
				}
			}
			runtime.KeepAlive(x)
		})
	}
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// envInt is the integer in the environment variable name, or def.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

// TestLibvirtDirectLinuxMigration is the Linux guest's baseline: libvirt to libvirt, no
// Lethe in the path, A to B and back LETHE_LIBVIRT_ROUNDS times with LETHE_LIBVIRT_LOAD
// goroutines spinning, as in TestLibvirtLetheLinuxMigration; LETHE_LIBVIRT_BANDWIDTH (MiB/s,
// default unlimited) slows the stream down to what Lethe's path carries, and
// LETHE_LIBVIRT_AUTOCONVERGE=0 turns auto-converge off.
func TestLibvirtDirectLinuxMigration(t *testing.T) {
	tb := newLinuxTestbed(t, "lethe-linux-direct", ciLinuxGuest)
	loadCPU(t, envInt("LETHE_LIBVIRT_LOAD", 0))
	hosts := [2]string{hostA, hostB}
	conns := [2]*libvirt.Conn{tb.a, tb.b}
	for i := range 2 * envInt("LETHE_LIBVIRT_ROUNDS", 1) {
		from, to := i%2, 1-i%2
		settings := benchSettings
		settings.Bandwidth = uint64(envInt("LETHE_LIBVIRT_BANDWIDTH", 0))
		settings.AutoConverge = envInt("LETHE_LIBVIRT_AUTOCONVERGE", 1) != 0
		settings.Parallel = envInt("LETHE_LIBVIRT_PARALLEL", 0)
		took := migrateDirectWith(t, hosts[from], hosts[to], tb.domain, settings)
		stats, err := conns[to].JobStats(t.Context(), tb.domain, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("migration %d to %s direct: %v, downtime %v, %d MiB, %d iterations",
			i+1, hosts[to], took, stats.Downtime, stats.DataProcessed>>20, stats.Iteration)
		tb.checkRunsOn(t, hosts[to])
	}
}

// BenchmarkLibvirtLinuxMigration moves the 1 GiB Linux guest back and forth between the
// hosts, directly (libvirt peer-to-peer) and through Lethe, each on QEMU's single migration
// stream and with two multifd channels, under a 300 ms and a 1 s downtime limit. It reports
// wall time (for Lethe from the request to the erasure receipt), downtime and bytes per
// migration, and where the CPU went: the machine's busy CPU time (both hosts, both QEMUs
// and the guest's vCPU share these cores) and this process's (the agents, and the broker and
// keybroker of the Lethe modes); it checks the guest's memory after the last one.
func BenchmarkLibvirtLinuxMigration(b *testing.B) {
	for _, limit := range []time.Duration{300 * time.Millisecond, time.Second} {
		for _, mode := range []string{"direct", "lethe", "direct-multifd", "lethe-multifd"} {
			b.Run(fmt.Sprintf("downtime=%v/%s", limit, mode), func(b *testing.B) {
				settings := libvirt.Settings{MaxDowntime: limit, AutoConverge: true}
				if strings.HasSuffix(mode, "-multifd") {
					settings.Parallel = 2
				}
				lethe := strings.HasPrefix(mode, "lethe")
				var opts []func(*libvirt.GuestConfig)
				if lethe {
					opts = append(opts, withLinuxMetadata)
				}
				qmp := recordQMP(b, hostA, hostB)
				tb := newLinuxTestbed(b, "lethe-linux-bench-"+mode, ciLinuxGuest, opts...)
				var e *letheEnv
				if lethe {
					e = startLetheBenchWith(b, letheLinuxVM, settings)
				}
				logs := serialLogSizes(b, tb.domain)
				b.ResetTimer()
				hosts := [2]string{hostA, hostB}
				conns := [2]*libvirt.Conn{tb.a, tb.b}
				var wall, down time.Duration
				var pause cutover
				var bytes uint64
				var machineCPU, selfCPU float64
				var arrived int64 // where the last destination's serial log was before the guest arrived
				for i := range b.N {
					from, to := i%2, 1-i%2
					arrived = serialLogSizes(b, tb.domain)[hosts[to]]
					start, machine0, self0 := time.Now(), machineBusySeconds(), cpuSeconds(os.Getpid())
					if lethe {
						migrateLethe(b, e, hosts[to])
					} else {
						migrateDirectWith(b, hosts[from], hosts[to], tb.domain, settings)
					}
					wall += time.Since(start)
					machineCPU += machineBusySeconds() - machine0
					selfCPU += cpuSeconds(os.Getpid()) - self0
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
				n := float64(b.N)
				b.ReportMetric(float64(wall.Milliseconds())/n, "wall-ms/op")
				b.ReportMetric(float64(down.Milliseconds())/n, "downtime-ms/op")
				pause.report(b)
				b.ReportMetric(float64(bytes>>20)/n, "MiB/op")
				b.ReportMetric(machineCPU/n, "machine-cpu-s/op")
				b.ReportMetric(selfCPU/n, "agents-cpu-s/op")
				b.ReportMetric(100*machineCPU/(wall.Seconds()*float64(runtime.NumCPU())), "busy-%")
				b.SetBytes(int64(bytes) / int64(b.N))
				b.StopTimer()
				// QEMU 7.2 under TCG sometimes resets this guest after a migration, or leaves
				// it silent, with or without Lethe in the path (README, Not done yet): a reset
				// or a hang after the last migration is counted, not a failure, so that every
				// mode's figures are measured. A page found bad is a failure either way.
				hung := awaitLinuxVerdict(b, hosts[b.N%2], tb.domain, arrived)
				boots, bad := linuxBootsSince(b, tb.domain, logs)
				b.ReportMetric(float64(boots), "resets")
				b.ReportMetric(float64(btoi(hung)), "hangs")
				if len(bad) > 0 {
					b.Fatalf("the Linux guest found bad pages: %q", bad)
				}
				if boots == 0 && !hung {
					tb.checkRunsOn(b, hosts[b.N%2])
				}
			})
		}
	}
}

// awaitLinuxVerdict waits until the Linux guest on host, whose serial log there is read from
// offset from, has swept its region twice or booted again; it reports whether the guest
// instead said nothing for a minute (hung).
func awaitLinuxVerdict(t testing.TB, host, domain string, from int64) (hung bool) {
	t.Helper()
	silent := time.Now().Add(time.Minute)
	waitFor(t, 3*time.Minute, "a verdict or a boot of the Linux guest on "+host, func() (bool, error) {
		st := readGuestStatus(t, host, domain, from)
		hung = st.Alive == 0 && st.Ready == 0 && time.Now().After(silent)
		return hung || st.Ready > 0 || len(st.Sweeps) >= 2 || len(st.BadLines) > 0, nil
	})
	return hung
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// serialLogSizes is where each host's serial log of domain ends now.
func serialLogSizes(t testing.TB, domain string) map[string]int64 {
	t.Helper()
	sizes := map[string]int64{}
	for _, host := range []string{hostA, hostB} {
		fi, err := os.Stat(serialLogOf(host, domain))
		switch {
		case err == nil:
			sizes[host] = fi.Size()
		case !errors.Is(err, os.ErrNotExist):
			t.Fatal(err)
		}
	}
	return sizes
}

// linuxBootsSince counts the Linux guest's boots in the hosts' serial logs after the
// offsets in from, and returns what it reported as bad there.
func linuxBootsSince(t testing.TB, domain string, from map[string]int64) (boots int, bad []string) {
	t.Helper()
	for _, host := range []string{hostA, hostB} {
		st := readGuestStatus(t, host, domain, from[host])
		boots += st.Ready
		bad = append(bad, st.BadLines...)
		for _, sw := range st.Sweeps {
			if sw.Bad > 0 {
				bad = append(bad, fmt.Sprintf("%s: a sweep of %d pages found %d bad", host, sw.Pages, sw.Bad))
			}
		}
	}
	return boots, bad
}

// machineBusySeconds is the CPU time all cores have spent busy since boot (/proc/stat: user,
// nice, system, irq, softirq and steal); zero if it cannot be read.
func machineBusySeconds() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0
	}
	var busy float64
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, _ := strconv.ParseFloat(f[i], 64)
		busy += v
	}
	return busy / 100 // clock ticks, 100 a second on Linux
}

// TestLibvirtRelayedLinuxMigration is the Linux guest through the step-by-step protocol and
// the test relay (plain TCP between stand-in agents): what Lethe's agents do, less their
// tunnel. A to B and back LETHE_LIBVIRT_ROUNDS times with LETHE_LIBVIRT_LOAD goroutines
// spinning.
func TestLibvirtRelayedLinuxMigration(t *testing.T) {
	tb := newLinuxTestbed(t, "lethe-linux-relayed", ciLinuxGuest)
	loadCPU(t, envInt("LETHE_LIBVIRT_LOAD", 0))
	hosts := [2]string{hostA, hostB}
	conns := [2]*libvirt.Conn{tb.a, tb.b}
	for i := range 2 * envInt("LETHE_LIBVIRT_ROUNDS", 1) {
		from, to := i%2, 1-i%2
		res, r, err := migrateRelayed(t, tb, conns[from], conns[to], hosts[from], hosts[to], 0)
		if err != nil {
			t.Fatalf("migration %d: %v (relay: %v)", i+1, err, r.err)
		}
		t.Logf("migration %d to %s relayed: %v, downtime %v, %d MiB, %d iterations",
			i+1, hosts[to], res.Elapsed, res.Stats.Downtime, res.Stats.DataProcessed>>20, res.Stats.Iteration)
		tb.checkRunsOn(t, hosts[to])
	}
}
