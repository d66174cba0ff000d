package libvirt

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/go-cmp/cmp"
)

func TestGuestXML(t *testing.T) {
	got, err := GuestXML(GuestConfig{Name: "g", SerialLog: "/var/log/libvirt/qemu/g.serial.log"})
	if err != nil {
		t.Fatal(err)
	}
	var d domainXML
	if err := xml.Unmarshal([]byte(got), &d); err != nil {
		t.Fatalf("GuestXML is not XML: %v\n%s", err, got)
	}
	for _, want := range []string{
		`<domain type="qemu">`, `<memory unit="MiB">128</memory>`, `<vcpu>1</vcpu>`,
		`<kernel>/boot/memtest86+x64.bin</kernel>`, `<cmdline>console=ttyS0,115200</cmdline>`,
		`<serial type="file">`, `<source path="/var/log/libvirt/qemu/g.serial.log" append="on"></source>`,
		`<controller type="usb" model="none"></controller>`, `<memballoon model="none"></memballoon>`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("GuestXML lacks %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, "<disk") || strings.Contains(got, "<interface") || strings.Contains(got, "<uuid>") {
		t.Errorf("GuestXML has a disk, a network or an unasked UUID:\n%s", got)
	}
}

func TestGuestXMLMetadata(t *testing.T) {
	md := `<x:guest xmlns:x="urn:test" tenant="acme"/>`
	got, err := GuestXML(GuestConfig{Name: "g", SerialLog: "/l.log", Metadata: md})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(got, "<metadata>"+md+"</metadata>") {
		t.Errorf("GuestXML lacks the metadata:\n%s", got)
	}
	if plain, _ := GuestXML(GuestConfig{Name: "g", SerialLog: "/l.log"}); strings.Contains(plain, "<metadata") {
		t.Errorf("GuestXML has metadata unasked:\n%s", plain)
	}
}

func TestGuestXMLInitrd(t *testing.T) {
	got, err := GuestXML(GuestConfig{Name: "g", SerialLog: "/l.log", Kernel: "/boot/vmlinuz", Initrd: "/i.cpio", Cmdline: "quiet"})
	if err != nil {
		t.Fatal(err)
	}
	if want := "<kernel>/boot/vmlinuz</kernel>\n    <initrd>/i.cpio</initrd>\n    <cmdline>quiet</cmdline>"; !strings.Contains(got, want) {
		t.Errorf("GuestXML lacks %q, in that order:\n%s", want, got)
	}
	if plain, _ := GuestXML(GuestConfig{Name: "g", SerialLog: "/l.log"}); strings.Contains(plain, "<initrd") {
		t.Errorf("GuestXML has an initrd unasked:\n%s", plain)
	}
}

func TestGuestXMLRejects(t *testing.T) {
	for name, cfg := range map[string]GuestConfig{
		"no name":         {SerialLog: "/x.log"},
		"relative serial": {Name: "g", SerialLog: "x.log"},
		"bad type":        {Name: "g", SerialLog: "/x.log", Type: "xen"},
		"negative memory": {Name: "g", SerialLog: "/x.log", MemoryMiB: -1},
	} {
		if _, err := GuestXML(cfg); err == nil {
			t.Errorf("%s: GuestXML accepted %+v", name, cfg)
		}
	}
}

func TestParseMemtestSerial(t *testing.T) {
	const screen = "\x1b[8;1H\x1b[0mCPU: 1 Cores 1 Threads    SMP: Disabled   | Time:  0:00:18  Status: Testing  \\  " +
		"\x1b[9;1HUsing: All Cores                          | Pass:  0        Errors: 0           "
	tests := map[string]struct {
		log  string
		want MemtestStatus
	}{
		"empty":   {"", MemtestStatus{}},
		"booting": {"\x1b[2J\x1b[1;1H memtest86+", MemtestStatus{}},
		"testing": {screen, MemtestStatus{Elapsed: 18 * time.Second, Seen: true}},
		"later redraw wins": {
			screen + strings.ReplaceAll(strings.ReplaceAll(screen, "0:00:18", "1:02:03"), "Pass:  0", "Pass:  2"),
			MemtestStatus{Elapsed: time.Hour + 2*time.Minute + 3*time.Second, Pass: 2, Seen: true},
		},
		"an error stays": {
			strings.ReplaceAll(screen, "Errors: 0", "Errors: 3") + screen,
			MemtestStatus{Elapsed: 18 * time.Second, Errors: 3, Seen: true},
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, ParseMemtestSerial([]byte(tt.log))); diff != "" {
				t.Errorf("ParseMemtestSerial (-want +got):\n%s", diff)
			}
		})
	}
}

func TestProgressFromParams(t *testing.T) {
	u := func(f string, v uint64) golibvirt.TypedParam {
		return golibvirt.TypedParam{Field: f, Value: *golibvirt.NewTypedParamValueUllong(v)}
	}
	params := []golibvirt.TypedParam{
		{Field: golibvirt.DomainJobOperationStr, Value: *golibvirt.NewTypedParamValueInt(3)},
		u(golibvirt.DomainJobTimeElapsed, 1500),
		u(golibvirt.DomainJobDataTotal, 128<<20),
		u(golibvirt.DomainJobDataProcessed, 200<<20),
		u(golibvirt.DomainJobDataRemaining, 4<<20),
		u(golibvirt.DomainJobMemoryBps, 150<<20),
		u(golibvirt.DomainJobMemoryDirtyRate, 30000),
		u(golibvirt.DomainJobMemoryPageSize, 4096),
		u(golibvirt.DomainJobMemoryIteration, 4),
		u(golibvirt.DomainJobDowntime, 120),
		u(golibvirt.DomainJobSetupTime, 3),
		{Field: golibvirt.DomainJobAutoConvergeThrottle, Value: *golibvirt.NewTypedParamValueInt(20)},
		u(golibvirt.DomainJobMemoryPostcopyReqs, 0),
		{Field: golibvirt.DomainJobErrmsg, Value: *golibvirt.NewTypedParamValueString("")},
		{Field: "something_new", Value: *golibvirt.NewTypedParamValueDouble(1.5)},
	}
	want := Progress{
		Job: JobUnbounded, Elapsed: 1500 * time.Millisecond,
		DataTotal: 128 << 20, DataProcessed: 200 << 20, DataRemaining: 4 << 20,
		MemoryBandwidth: 150 << 20, DirtyRate: 30000, PageSize: 4096, Iteration: 4,
		Downtime: 120 * time.Millisecond, SetupTime: 3 * time.Millisecond,
		AutoConvergeThrottle: 20, Operation: 3,
	}
	got := progressFromParams(JobUnbounded, params)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("progressFromParams (-want +got):\n%s", diff)
	}
	if got.DirtyBytesPerSecond() != 30000*4096 {
		t.Errorf("DirtyBytesPerSecond = %d", got.DirtyBytesPerSecond())
	}
}

func TestEndpoint(t *testing.T) {
	tests := map[string]struct {
		ep      Endpoint
		uri     string
		invalid bool
	}{
		"unix":              {ep: UnixEndpoint("/run/lethe/m.sock"), uri: "unix:///run/lethe/m.sock"},
		"loopback":          {ep: LoopbackEndpoint(49152), uri: "tcp://127.0.0.1:49152"},
		"loopback v6":       {ep: Endpoint{"tcp", "[::1]:5000"}, uri: "tcp://[::1]:5000"},
		"relative unix":     {ep: UnixEndpoint("m.sock"), invalid: true},
		"unclean unix":      {ep: UnixEndpoint("/run/../m.sock"), invalid: true},
		"remote tcp":        {ep: Endpoint{"tcp", "10.0.0.2:49152"}, invalid: true},
		"any address":       {ep: Endpoint{"tcp", "0.0.0.0:49152"}, invalid: true},
		"host name":         {ep: Endpoint{"tcp", "localhost:49152"}, invalid: true},
		"no port":           {ep: Endpoint{"tcp", "127.0.0.1:0"}, invalid: true},
		"other network":     {ep: Endpoint{"rdma", "127.0.0.1:1"}, invalid: true},
		"empty":             {invalid: true},
		"tcp without colon": {ep: Endpoint{"tcp", "127.0.0.1"}, invalid: true},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := tt.ep.Validate()
			if tt.invalid {
				if !errors.Is(err, ErrNotLocalEndpoint) {
					t.Fatalf("Validate(%+v) = %v; want %v", tt.ep, err, ErrNotLocalEndpoint)
				}
				return
			}
			if err != nil {
				t.Fatalf("Validate(%+v) = %v", tt.ep, err)
			}
			if got := tt.ep.URI(); got != tt.uri {
				t.Errorf("URI = %q; want %q", got, tt.uri)
			}
		})
	}
}

func TestPrepareAndPerformRefuseRemoteEndpoints(t *testing.T) {
	remote := Endpoint{"tcp", "192.0.2.1:49152"}
	// Neither reaches libvirt: the endpoint is checked first.
	if _, _, err := (&Conn{}).Prepare(t.Context(), Offer{Domain: "g"}, remote); !errors.Is(err, ErrNotLocalEndpoint) {
		t.Errorf("Prepare to %v: %v; want %v", remote, err, ErrNotLocalEndpoint)
	}
	if _, err := (&Source{}).Perform(t.Context(), Accepted{}, remote); !errors.Is(err, ErrNotLocalEndpoint) {
		t.Errorf("Perform to %v: %v; want %v", remote, err, ErrNotLocalEndpoint)
	}
	if _, err := ListenEndpoint(t.Context(), remote); !errors.Is(err, ErrNotLocalEndpoint) {
		t.Errorf("ListenEndpoint on %v: %v; want %v", remote, err, ErrNotLocalEndpoint)
	}
	if _, err := DialEndpoint(t.Context(), remote); !errors.Is(err, ErrNotLocalEndpoint) {
		t.Errorf("DialEndpoint %v: %v; want %v", remote, err, ErrNotLocalEndpoint)
	}
}

// TestSplice joins a "hypervisor" on a unix endpoint to a "peer" over TCP and checks both
// directions arrive whole and each half-close is passed on.
func TestSplice(t *testing.T) {
	ctx := t.Context()
	ep := UnixEndpoint(filepath.Join(t.TempDir(), "m.sock"))
	ln, err := ListenEndpoint(ctx, ep)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hv, err := DialEndpoint(ctx, ln.Endpoint()) // the hypervisor's side
	if err != nil {
		t.Fatal(err)
	}
	agentSide, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tcpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpLn.Close()
	peerOut, err := net.Dial("tcp", tcpLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, err := tcpLn.Accept() // the far side of the carrier
	if err != nil {
		t.Fatal(err)
	}

	type result struct {
		res SpliceResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := Splice(ctx, agentSide, peerOut)
		done <- result{r, err}
	}()

	forward := bytes.Repeat([]byte("guest page "), 100000)
	back := []byte("return path")
	go func() {
		hv.Write(forward)
		hv.(*net.UnixConn).CloseWrite()
	}()
	got, err := io.ReadAll(peer) // ends only if the half-close was passed on
	if err != nil || !bytes.Equal(got, forward) {
		t.Fatalf("peer read %d bytes, %v; want %d", len(got), err, len(forward))
	}
	peer.Write(back)
	peer.(*net.TCPConn).CloseWrite()
	got, err = io.ReadAll(hv)
	if err != nil || !bytes.Equal(got, back) {
		t.Fatalf("hypervisor read %q, %v; want %q", got, err, back)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if want := (SpliceResult{AToB: int64(len(forward)), BToA: int64(len(back))}); r.res != want {
		t.Errorf("Splice = %+v; want %+v", r.res, want)
	}
}

func TestSpliceEndsWithContext(t *testing.T) {
	a1, a2 := net.Pipe()
	b1, b2 := net.Pipe()
	defer a2.Close()
	defer b2.Close()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := Splice(ctx, a1, b1)
		done <- err
	}()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Splice after cancel = %v; want %v", err, context.Canceled)
	}
}

func TestStateNames(t *testing.T) {
	if StateRunning.String() != "running" || StateShutoff.Active() || !StatePaused.Active() || State(42).String() != "state(42)" {
		t.Error("state names or activity wrong")
	}
	if JobCompleted.String() != "completed" || JobType(9).String() != "job(9)" {
		t.Error("job names wrong")
	}
}

func TestParseCapabilities(t *testing.T) {
	const caps = `<capabilities><host><uuid>6c657468-6500-4a00-8000-0000000000a1</uuid>
<cpu><arch>x86_64</arch><model>EPYC</model><vendor>AMD</vendor></cpu></host>
<guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/></arch></guest>
<guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest>
</capabilities>`
	h, err := parseCapabilities(caps)
	if err != nil {
		t.Fatal(err)
	}
	want := Host{UUID: "6c657468-6500-4a00-8000-0000000000a1", Arch: "x86_64", CPUModel: "EPYC", CPUVendor: "AMD",
		DomainTypes: []string{"qemu", "kvm"}, CapabilitiesXML: caps}
	if diff := cmp.Diff(want, h); diff != "" {
		t.Errorf("parseCapabilities (-want +got):\n%s", diff)
	}
	if _, err := parseCapabilities("<capabilities"); err == nil {
		t.Error("parseCapabilities accepted broken XML")
	}
}

func TestFormatUUID(t *testing.T) {
	u := golibvirt.UUID{0x6c, 0x65, 0x74, 0x68, 0x65, 0, 0x4a, 0, 0x80, 0, 0, 0, 0, 0, 0, 0xa1}
	if got, want := formatUUID(u), "6c657468-6500-4a00-8000-0000000000a1"; got != want {
		t.Errorf("formatUUID = %s; want %s", got, want)
	}
}
