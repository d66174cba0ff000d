package migagent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestTunnelRecords sends records one way through a tunnel (driver to data plane) and back
// in (data plane to driver), with the half-close passed on as the end of records.
func TestTunnelRecords(t *testing.T) {
	tun := newTunnel(false)
	want := []struct {
		typ byte
		p   []byte
	}{
		{recOffer, []byte(`{"domain":"d"}`)},
		{recData, bytes.Repeat([]byte{7}, dataChunk)},
		{recEnd, nil},
		{recPerformed, []byte("cookie")},
	}
	go func() {
		for _, r := range want {
			if err := tun.send(r.typ, r.p); err != nil {
				t.Error(err)
			}
		}
		tun.end(nil)
	}()
	// What the data plane would send is what it would receive at the peer.
	wire, err := io.ReadAll(tun)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		tun.Write(wire)
		tun.CloseWrite()
	}()
	for i, w := range want {
		typ, p, err := tun.recv()
		if err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		if typ != w.typ || !bytes.Equal(p, w.p) {
			t.Fatalf("record %d: %q with %d bytes, want %q with %d", i, typ, len(p), w.typ, len(w.p))
		}
	}
	if _, _, err := tun.recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last record: %v, want EOF", err)
	}
}

// TestTunnelFailsUnderABlockedWrite: the driver's write blocks on a data plane that no longer
// reads (its handshake was refused); ending the tunnel with an error must not wait for that
// write, and must end it.
func TestTunnelFailsUnderABlockedWrite(t *testing.T) {
	tun := newTunnel(true)
	sent := make(chan error, 1)
	go func() { sent <- tun.send(recOffer, []byte("offer")) }()
	// The data plane reads one byte and no more: the send is then inside its write, holding
	// the write lock, and stays there.
	if _, err := tun.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	go func() { tun.end(errors.New("data plane failed")); close(ended) }()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("ending the tunnel with an error waited for the blocked write")
	}
	select {
	case err := <-sent:
		if err == nil {
			t.Error("the blocked send succeeded after the tunnel ended with an error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked send did not end with the tunnel")
	}
}

// TestTunnelClosed checks that the data plane closing the tunnel ends the driver's calls.
func TestTunnelClosed(t *testing.T) {
	tun := newTunnel(false)
	tun.Close()
	if err := tun.send(recData, []byte("x")); !errors.Is(err, errTunnelClosed) {
		t.Errorf("send after Close: %v", err)
	}
	if _, _, err := tun.recv(); !errors.Is(err, errTunnelClosed) {
		t.Errorf("recv after Close: %v", err)
	}
}

func TestToHypervisorHalfClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, r := range []struct {
		typ byte
		p   []byte
	}{{recData, []byte("QEVM")}, {recEnd, nil}} {
		if ok, err := toHypervisor(c, r.typ, r.p); !ok || err != nil {
			t.Fatalf("record %q: %v, %v", r.typ, ok, err)
		}
	}
	if ok, _ := toHypervisor(c, recFinished, nil); ok {
		t.Error("a finished record was taken for the hypervisor")
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "QEVM" {
		t.Errorf("hypervisor got %q", got)
	}
}

func TestGuestElement(t *testing.T) {
	n := &Node{cfg: Config{Libvirt: LibvirtConfig{Tenant: "ops"}}}
	domain := `<domain type="qemu"><name>vm1</name><metadata>` + GuestMetadata("acme", "web") + `</metadata></domain>`
	tests := map[string]struct {
		doc, domain string
		metadata    bool
		want        []string
	}{
		"domain XML":             {doc: domain, domain: "vm1", want: []string{"acme", "web"}},
		"metadata from libvirt":  {doc: `<guest tenant="acme"/>`, domain: "vm1", metadata: true, want: []string{"acme", "vm1"}},
		"foreign namespace":      {doc: `<domain><metadata><x:guest xmlns:x="urn:other" tenant="evil"/></metadata></domain>`, domain: "vm1", want: []string{"ops", "vm1"}},
		"default tenant":         {doc: "", domain: "vm2", want: []string{"ops", "vm2"}},
		"invalid name":           {doc: "", domain: "bad.name", want: nil},
		"invalid metadata names": {doc: `<guest tenant="a/b"/>`, domain: "vm1", metadata: true, want: nil},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			tenant, vm, ok := n.identify(tc.doc, tc.domain, tc.metadata)
			var got []string
			if ok {
				got = []string{tenant, vm}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// FuzzReadRecord feeds the tunnel's record decoder arbitrary bytes: it must return records
// of known types within the size bound, or an error, and never panic.
func FuzzReadRecord(f *testing.F) {
	rec := func(typ byte, p string) []byte {
		b := []byte{typ, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(b[1:], uint32(len(p)))
		return append(b, p...)
	}
	f.Add(rec(recOffer, `{"domain":"d","xml":"<domain/>"}`))
	f.Add(append(rec(recData, "QEVM"), rec(recEnd, "")...))
	f.Add([]byte{recData, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{'Z', 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			typ, p, err := readRecord(r, nil)
			if err != nil {
				return
			}
			switch typ {
			case recOffer, recAccepted, recData, recEnd, recPerformed, recFinished:
			default:
				t.Fatalf("record of unknown type %#x", typ)
			}
			if len(p) > maxRecord {
				t.Fatalf("record of %d bytes", len(p))
			}
		}
	})
}
