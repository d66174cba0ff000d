//go:build libvirt

package e2e

import (
	"bufio"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"
)

// qmpRecorder keeps the QMP events that QEMU emits for every domain on the hosts, each with
// QEMU's own timestamp: `virsh qemu-monitor-event --loop` against each host's libvirtd, for
// as long as the test runs. Both hosts share this machine's clock, so the timestamps of the
// source's and the destination's QEMU can be subtracted.
type qmpRecorder struct {
	mu     sync.Mutex
	events []qmpEvent
}

type qmpEvent struct {
	host, domain, name, data string
	at                       time.Time
}

// virsh prints, without --timestamp, the event's own time:
//
//	event MIGRATION at 1733456789.123456 for domain 'x': {"status":"completed"}
var qmpLine = regexp.MustCompile(`^event (\S+) at (\d+)\.(\d{6}) for domain '([^']*)': (.*)$`)

// recordQMP starts a recorder on hosts; it stops when the test ends.
func recordQMP(t testing.TB, hosts ...string) *qmpRecorder {
	t.Helper()
	if _, err := exec.LookPath("virsh"); err != nil {
		t.Fatalf("virsh (libvirt-clients) is needed to time the cutover: %v", err)
	}
	r := &qmpRecorder{}
	for _, host := range hosts {
		cmd := exec.CommandContext(t.Context(), "virsh", "-c", "qemu+unix:///system?socket="+socketOf(host),
			"qemu-monitor-event", "--loop")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting virsh qemu-monitor-event on %s: %v", host, err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			sc := bufio.NewScanner(out)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				if ev, ok := parseQMPLine(host, sc.Text()); ok {
					r.mu.Lock()
					r.events = append(r.events, ev)
					r.mu.Unlock()
				}
			}
		}()
		t.Cleanup(func() { cmd.Process.Kill(); <-done; cmd.Wait() })
	}
	// virsh registers its callback a moment after it starts, long before the first
	// migration (the guest boots first); a migration it missed fails cutover, not silently.
	return r
}

func parseQMPLine(host, line string) (qmpEvent, bool) {
	m := qmpLine.FindStringSubmatch(line)
	if m == nil {
		return qmpEvent{}, false
	}
	sec, err1 := strconv.ParseInt(m[2], 10, 64)
	usec, err2 := strconv.ParseInt(m[3], 10, 64)
	if err1 != nil || err2 != nil {
		return qmpEvent{}, false
	}
	return qmpEvent{host: host, name: m[1], at: time.Unix(sec, usec*1000), domain: m[4], data: m[5]}, true
}

// cutover is a migration's pause taken apart by QEMU's events:
//   - finalRound: the source's STOP to its MIGRATION "completed": QEMU writing the last dirty
//     pages and the device state into its migration stream, at the rate the path accepts them;
//   - delivery: from there to the destination QEMU's MIGRATION "completed": what was still in
//     flight (buffers between the two QEMUs) and the destination loading it;
//   - handover: from there to the destination's RESUME: libvirt's Finish (through Lethe, the
//     agents' exchange that leads to it).
type cutover struct {
	finalRound, delivery, handover time.Duration
}

func (c cutover) total() time.Duration { return c.finalRound + c.delivery + c.handover }

func (c cutover) add(d cutover) cutover {
	return cutover{c.finalRound + d.finalRound, c.delivery + d.delivery, c.handover + d.handover}
}

// report reports c, the sum over b.N migrations, as means per migration.
func (c cutover) report(b *testing.B) {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N) }
	b.ReportMetric(ms(c.finalRound), "final-round-ms/op")
	b.ReportMetric(ms(c.delivery), "delivery-ms/op")
	b.ReportMetric(ms(c.handover), "handover-ms/op")
}

func (c cutover) String() string {
	return fmt.Sprintf("paused %v = final round %v + delivery %v + hand-over %v",
		c.total().Round(time.Millisecond), c.finalRound.Round(time.Millisecond),
		c.delivery.Round(time.Millisecond), c.handover.Round(time.Millisecond))
}

// cutover finds the events of domain's migration from host from to host to begun after
// since. virsh may print the last of them a moment after the migration returns.
func (r *qmpRecorder) cutover(t testing.TB, domain, from, to string, since time.Time) cutover {
	t.Helper()
	var c cutover
	waitFor(t, 10*time.Second, "QEMU's cutover events of "+domain, func() (bool, error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		find := func(host, name, data string, after time.Time) (time.Time, bool) {
			for _, ev := range r.events {
				if ev.host == host && ev.domain == domain && ev.name == name && ev.at.After(after) &&
					(data == "" || ev.data == data) {
					return ev.at, true
				}
			}
			return time.Time{}, false
		}
		stop, ok := find(from, "STOP", "", since)
		if !ok {
			return false, nil
		}
		sent, ok := find(from, "MIGRATION", `{"status":"completed"}`, stop)
		if !ok {
			return false, nil
		}
		loaded, ok := find(to, "MIGRATION", `{"status":"completed"}`, since)
		if !ok {
			return false, nil
		}
		resumed, ok := find(to, "RESUME", "", loaded)
		if !ok {
			return false, nil
		}
		c = cutover{finalRound: sent.Sub(stop), delivery: loaded.Sub(sent), handover: resumed.Sub(loaded)}
		return true, nil
	})
	return c
}
