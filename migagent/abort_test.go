package migagent

import (
	"crypto/rand"
	"slices"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// TestAbortingLargeDestinationStallsNothingElse aborts a 2 GiB destination (scrubbing and
// releasing its receive region takes most of a second here) while another migration into
// the same host is in flight. The abort holds only its own migration's lock: while it
// scrubs, the host record a heartbeat sends and the other migration's status are read at
// once, heartbeats keep reaching the broker, and the other migration commits. With the
// node-wide lock held across the scrub, as before, no heartbeat could be sent until the
// abort ended, and a scrub longer than the broker's host TTL made the broker abort the
// host's other migrations as "agent lost".
func TestAbortingLargeDestinationStallsNothingElse(t *testing.T) {
	// Generous: on a loaded 2-core machine, faulting in a 2 GiB region can delay the
	// heartbeats of every agent in this process by seconds.
	const hostTTL = 10 * time.Second
	e := newEnvHostTTL(t, hostTTL)
	e.heartbeat = 100 * time.Millisecond
	base := attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 115}
	a := e.startNode("host-a", base, GuestSpec{Tenant: testTenant, VM: testVM, MemoryBytes: 8 << 20})
	c := e.startNode("host-c", base)
	e.waitHost("host-a", hasGuest(true))
	e.waitHost("host-c", hasGuest(false))
	if _, err := e.tenant.AdoptGuest(t.Context(), &broker.AdoptGuestRequest{VM: testVM, Host: "host-a"}); err != nil {
		t.Fatalf("adopting: %v", err)
	}

	// The large destination, prepared on host-c directly: its region is scrubbed once here
	// and once more by the abort.
	nonce := make([]byte, 32)
	rand.Read(nonce)
	if _, err := c.n.Prepare(t.Context(), &agentapi.PrepareRequest{
		MigrationID: "large", Nonce: nonce, Tenant: testTenant, VM: "large", MemoryBytes: 2 << 30,
	}); err != nil {
		t.Fatal(err)
	}

	// The other migration, host-a to host-c, held in flight by a gate on the source's writes.
	g := newGate(256 << 10)
	setDial(a.n, g.dial)
	id := e.migrate("host-c")
	select {
	case <-g.reached:
	case <-time.After(waitLimit):
		t.Fatal("the transfer to host-c did not start")
	}

	kv, err := e.js.KeyValue(t.Context(), agentapi.HostsBucket)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(t.Context(), "host-c")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	beats := make(chan time.Time, 1024)
	go func() {
		for ent := range w.Updates() {
			if ent != nil {
				beats <- time.Now()
			}
		}
		close(beats)
	}()

	c.n.mu.Lock()
	large := c.n.migs["large"]
	c.n.mu.Unlock()
	start := time.Now()
	var (
		resp    *agentapi.AbortResponse
		aerr    error
		aborted = make(chan struct{})
	)
	go func() {
		defer close(aborted)
		resp, aerr = c.n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "large", Reason: "test"})
	}()
	// Once the abort holds the large migration's lock, it is scrubbing: the host record (what
	// a heartbeat sends) and the other migration's status must not wait for it.
	for large.mu.TryLock() {
		large.mu.Unlock()
		select {
		case <-aborted:
			t.Fatal("the abort ended before it could be observed")
		case <-time.After(time.Millisecond):
		}
	}
	rec := c.n.record()
	st, serr := c.n.Status(t.Context(), &agentapi.StatusRequest{MigrationID: id})
	select {
	case <-aborted:
		t.Errorf("the host record and the other migration's status waited for the abort of the large destination")
	default:
	}
	if serr != nil || !st.Known || !st.KeysHeld || rec.Host != "host-c" {
		t.Errorf("during the abort: host record %+v, other migration %+v, %v", rec, st, serr)
	}
	<-aborted
	end := time.Now()
	if aerr != nil || resp.Resumed || len(resp.Statement) == 0 {
		t.Fatalf("aborting the large destination: %+v, %v", resp, aerr)
	}
	w.Stop()
	var during []time.Time
	for b := range beats {
		if !b.Before(start) && !b.After(end) {
			during = append(during, b)
		}
	}
	// The longest time host-c went without a stored heartbeat while the abort ran.
	points := slices.Concat([]time.Time{start}, during, []time.Time{end})
	var gap time.Duration
	for i := 1; i < len(points); i++ {
		gap = max(gap, points[i].Sub(points[i-1]))
	}
	t.Logf("abort of the 2 GiB destination took %v; %d heartbeats stored meanwhile, longest gap %v", end.Sub(start), len(during), gap)
	if gap >= hostTTL {
		t.Errorf("host-c went %v without a heartbeat during the abort; the broker counts a host lost after %v", gap, hostTTL)
	}

	close(g.open)
	m := e.waitEnd(id)
	if m.Phase != broker.PhaseErased {
		t.Fatalf("the other migration ended %s (reason %q, notes %q), want Erased", m.Phase, m.AbortReason, m.Notes)
	}
	e.waitHost("host-c", hasGuest(true))
}
