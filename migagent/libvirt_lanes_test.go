package migagent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/libvirt"
	"github.com/lethe-cc/lethe/migagent/libvirt/libvirttest"
)

// TestHVLane: a lane waits for its hypervisor connection and then carries it; a lane closed
// first fails its reads and closes a connection attached later; at the source nothing may
// be written to a lane; a hypervisor that keeps its side open past endTimeout has it ended
// for it, so that the data plane reads the lane's end.
func TestHVLane(t *testing.T) {
	t.Run("carries its connection once attached", func(t *testing.T) {
		l := newHVLane(false)
		agent, hv := net.Pipe()
		got := make(chan string, 1)
		go func() {
			b := make([]byte, 5)
			n, _ := io.ReadFull(l, b)
			got <- string(b[:n])
		}()
		l.attach(agent)
		go hv.Write([]byte("hello"))
		if s := <-got; s != "hello" {
			t.Errorf("read %q through the lane, want hello", s)
		}
		l.Close()
	})
	t.Run("closed before attached", func(t *testing.T) {
		l := newHVLane(false)
		l.Close()
		if _, err := l.Read(make([]byte, 1)); !errors.Is(err, errTunnelClosed) {
			t.Errorf("read: %v, want errTunnelClosed", err)
		}
		agent, hv := net.Pipe()
		l.attach(agent)
		if _, err := hv.Write([]byte("x")); err == nil {
			t.Error("the connection attached to a closed lane is still open")
		}
	})
	t.Run("source lanes take nothing back", func(t *testing.T) {
		l := newHVLane(true)
		if _, err := l.Write([]byte("back")); !errors.Is(err, errLaneSendOnly) {
			t.Errorf("write: %v, want errLaneSendOnly", err)
		}
	})
	t.Run("a hypervisor that keeps its side open", func(t *testing.T) {
		l := newHVLane(false)
		agent, hv := unixPair(t)
		defer hv.Close()
		l.attach(agent)
		defer l.Close()
		go l.finish(10 * time.Millisecond)
		if _, err := l.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Errorf("read after the timeout: %v, want io.EOF", err)
		}
	})
}

// unixPair is a connected pair of unix sockets (they can be half-closed).
func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	path := t.TempDir() + "/s"
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *net.UnixConn, 1)
	go func() { c, _ := ln.AcceptUnix(); accepted <- c }()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	return <-accepted, c
}

// TestLibvirtOfferMustMatchLanes: a destination refuses an offer whose multifd channels are
// not the lanes its session settled on, before it prepares anything: a source cannot make
// it wait for channels that will not come, or leave a channel without a lane.
func TestLibvirtOfferMustMatchLanes(t *testing.T) {
	for _, tc := range []struct{ lanes, parallel int }{{0, 2}, {2, 0}, {2, 1}} {
		srcHV, dstHV := libvirttest.New(), libvirttest.New()
		srcHV.Define(lvDomain, []byte("memory"), GuestMetadata(testTenant, testVM))
		_, offer, err := srcHV.Begin(t.Context(), lvDomain, libvirt.Settings{})
		if err != nil {
			t.Fatal(err)
		}
		offer.Parallel = tc.parallel
		b, err := json.Marshal(offer)
		if err != nil {
			t.Fatal(err)
		}
		n := lvNode(t, "dst", dstHV)
		tun := newTunnel(false)
		for i := 1; i <= tc.lanes; i++ {
			tun.hvLane(i)
		}
		m := newMigration("lv-1", attest.RoleDestination, testTenant, testVM, 6, phaseReceiving)
		m.lv = &lvMigration{tun: tun}
		rec := binary.BigEndian.AppendUint32([]byte{recOffer}, uint32(len(b)))
		go tun.Write(append(rec, b...))
		var d destinationDriver
		err = d.steps(context.Background(), n, m, tun)
		if err == nil || !strings.Contains(err.Error(), "multifd channels") {
			t.Errorf("%d lanes, %d channels offered: %v, want the offer refused", tc.lanes, tc.parallel, err)
		}
		if slices.ContainsFunc(dstHV.Calls(), func(c libvirttest.Call) bool { return c.Step == libvirttest.StepPrepare }) {
			t.Errorf("%d lanes, %d channels offered: the destination prepared", tc.lanes, tc.parallel)
		}
		tun.Close()
	}
}
