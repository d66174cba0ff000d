package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"net"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// capture records the agents' data-plane traffic: every TCP segment on the loopback interface
// to or from an address of 127.77.0.0/16, where every agent's data-plane listener and every
// relay is. It does not keep the bytes; it scans them, per flow and across segment
// boundaries, for what a plaintext guest page looks like.
//
// The guests' page contents are known: an agent's in-process guest starts with every page
// stamped with its index plus one (8 bytes, little endian) and zeros after it, and the
// synthetic workload writes 8-byte counters at spread offsets, so every plaintext page holds
// runs of hundreds of zero bytes. The scan reports a run of plainRun zero bytes in a flow.
// Sealed pages (AES-GCM) never hold one, and the clear-text handshake messages and frame
// headers hold at most a few dozen zeros in a row.
type capture struct {
	fd   int
	stop chan struct{}

	mu    sync.Mutex
	flows map[flowKey]*flowScan
	bytes int64
	hits  []string
}

// plainRun is the run of zero bytes that only a plaintext page makes.
const plainRun = 64

type flowKey struct {
	src, dst [4]byte
	sp, dp   uint16
}

// flowScan is the state of a flow's scan that spans segments: the current run of zeros.
type flowScan struct {
	zeros int
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// startCapture opens a packet socket on the loopback interface. It needs CAP_NET_RAW and
// fails the test without it: the suite must not pass without having looked at the wire.
func startCapture(t testing.TB) *capture {
	t.Helper()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatalf("capture: finding the loopback interface: %v", err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatalf("capture: opening a packet socket (the data-plane capture needs CAP_NET_RAW): %v", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 256<<20); err != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 64<<20)
	}
	// In the kernel, keep only incoming IPv4 segments from or to 127.77.0.0/16: the machine's
	// other loopback traffic must not crowd the socket.
	filter := []unix.SockFilter{
		{Code: 0x20, K: 0xfffff004},               // A = packet type
		{Code: 0x15, Jt: 9, K: 4},                 // outgoing (each segment is seen twice): drop
		{Code: 0x28, K: 12},                       // A = ethertype
		{Code: 0x15, Jf: 7, K: 0x0800},            // not IPv4: drop
		{Code: 0x20, K: 26},                       // A = source address
		{Code: 0x54, K: 0xffff0000},               // A &= /16
		{Code: 0x15, Jt: 3, K: 0x7f4d0000},        // 127.77/16: accept
		{Code: 0x20, K: 30},                       // A = destination address
		{Code: 0x54, K: 0xffff0000},               // A &= /16
		{Code: 0x15, Jt: 0, Jf: 1, K: 0x7f4d0000}, // 127.77/16: accept, else drop
		{Code: 0x06, K: 1 << 18},                  // accept
		{Code: 0x06, K: 0},                        // drop
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}); err != nil {
		unix.Close(fd)
		t.Fatalf("capture: attaching the packet filter: %v", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: lo.Index}); err != nil {
		unix.Close(fd)
		t.Fatalf("capture: binding to lo: %v", err)
	}
	// A receive timeout lets the reader see that the capture is stopping.
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100_000}); err != nil {
		unix.Close(fd)
		t.Fatalf("capture: setting a receive timeout: %v", err)
	}
	c := &capture{fd: fd, flows: map[flowKey]*flowScan{}, stop: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.run()
	}()
	t.Cleanup(func() {
		close(c.stop)
		<-done
		unix.Close(fd)
	})
	return c
}

func (c *capture) run() {
	buf := make([]byte, 1<<17)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if err == unix.EINTR || err == unix.EAGAIN {
				continue
			}
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue // each loopback segment is seen going out and coming in
		}
		c.packet(buf[:n])
	}
}

// packet scans one Ethernet frame from lo.
func (c *capture) packet(b []byte) {
	if len(b) < 14+20 || binary.BigEndian.Uint16(b[12:14]) != unix.ETH_P_IP {
		return
	}
	ip := b[14:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if ip[0]>>4 != 4 || ip[9] != unix.IPPROTO_TCP || ihl < 20 || total > len(ip) || total < ihl+20 {
		return
	}
	var k flowKey
	copy(k.src[:], ip[12:16])
	copy(k.dst[:], ip[16:20])
	if !dataPlane(k.src) && !dataPlane(k.dst) {
		return
	}
	tcp := ip[ihl:total]
	k.sp, k.dp = binary.BigEndian.Uint16(tcp[0:2]), binary.BigEndian.Uint16(tcp[2:4])
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return
	}
	payload := tcp[off:]
	if len(payload) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.bytes += int64(len(payload))
	f := c.flows[k]
	if f == nil {
		f = &flowScan{}
		c.flows[k] = f
	}
	if hit := f.scan(payload); hit != "" && len(c.hits) < 20 {
		c.hits = append(c.hits, net.IP(k.src[:]).String()+" → "+net.IP(k.dst[:]).String()+": "+hit)
	}
}

func dataPlane(a [4]byte) bool { return a[0] == 127 && a[1] == 77 }

// scan feeds p to the flow's scan and returns a description of the first plaintext sign.
func (f *flowScan) scan(p []byte) string {
	lead := len(p) - len(bytes.TrimLeft(p, "\x00"))
	hit := f.zeros+lead >= plainRun || bytes.Contains(p, zeroRun[:])
	if lead == len(p) {
		f.zeros += lead
	} else {
		f.zeros = len(p) - len(bytes.TrimRight(p, "\x00"))
	}
	if hit {
		return "a run of 64 zero bytes: a plaintext guest page"
	}
	return ""
}

var zeroRun [plainRun]byte

// mark returns the capture's counters, to compare with a later mark.
func (c *capture) mark() captureMark {
	c.mu.Lock()
	defer c.mu.Unlock()
	return captureMark{bytes: c.bytes, hits: len(c.hits)}
}

type captureMark struct {
	bytes int64
	hits  int
}

// since returns the bytes captured and the plaintext signs found since m.
func (c *capture) since(m captureMark) (int64, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bytes - m.bytes, append([]string(nil), c.hits[m.hits:]...)
}

// drops returns how many packets the kernel dropped for the capture's socket since the last
// call.
func (c *capture) drops() uint32 {
	var st unix.TpacketStats
	l := uint32(unsafe.Sizeof(st))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(c.fd), unix.SOL_PACKET, unix.PACKET_STATISTICS,
		uintptr(unsafe.Pointer(&st)), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return 0
	}
	return st.Drops
}

// TestCaptureScan checks the plaintext scan on what it must and must not find.
func TestCaptureScan(t *testing.T) {
	page := make([]byte, 4096)
	binary.LittleEndian.PutUint64(page, 42) // a guest page stamp
	binary.LittleEndian.PutUint64(page[1024:], 7)
	sealed := make([]byte, 1<<16)
	rand.Read(sealed)
	header := []byte{1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x10}
	tests := map[string]struct {
		segments [][]byte
		want     bool
	}{
		"plaintext page":               {[][]byte{page}, true},
		"page split across segments":   {[][]byte{page[:40], page[40:80], page[80:100]}, true},
		"sealed pages":                 {[][]byte{sealed, sealed}, false},
		"frame headers and ciphertext": {[][]byte{header, sealed[:100], header, sealed[100:200]}, false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var f flowScan
			got := false
			for _, seg := range tc.segments {
				got = f.scan(seg) != "" || got
			}
			if got != tc.want {
				t.Errorf("scan found plaintext: %v, want %v", got, tc.want)
			}
		})
	}
}
