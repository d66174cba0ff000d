package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
)

// ErrNotLocalEndpoint is returned for a migration endpoint that is neither an absolute unix
// socket path nor a loopback TCP address with a port.
var ErrNotLocalEndpoint = errors.New("migration endpoint is not local")

// Endpoint is a local endpoint of a hypervisor's migration stream: a unix socket, or a TCP
// port on loopback. On the destination the hypervisor listens there and the destination agent
// dials it; on the source the source agent listens there and the hypervisor dials it.
type Endpoint struct {
	// Network is "unix" or "tcp".
	Network string
	// Address is an absolute socket path for "unix", or a loopback ip:port for "tcp".
	Address string
}

// UnixEndpoint is the endpoint of the unix socket at path.
func UnixEndpoint(path string) Endpoint { return Endpoint{Network: "unix", Address: path} }

// LoopbackEndpoint is the endpoint of TCP port on 127.0.0.1.
func LoopbackEndpoint(port uint16) Endpoint {
	return Endpoint{Network: "tcp", Address: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String()}
}

// Validate returns an error wrapping ErrNotLocalEndpoint unless e is an absolute unix socket
// path or a loopback TCP address with a non-zero port.
func (e Endpoint) Validate() error {
	switch e.Network {
	case "unix":
		if !filepath.IsAbs(e.Address) || filepath.Clean(e.Address) != e.Address {
			return fmt.Errorf("%w: unix socket %q is not a clean absolute path", ErrNotLocalEndpoint, e.Address)
		}
		return nil
	case "tcp":
		ap, err := netip.ParseAddrPort(e.Address)
		if err != nil {
			return fmt.Errorf("%w: %q: %w", ErrNotLocalEndpoint, e.Address, err)
		}
		if !ap.Addr().IsLoopback() || ap.Port() == 0 {
			return fmt.Errorf("%w: %s is not a loopback address with a port", ErrNotLocalEndpoint, e.Address)
		}
		return nil
	}
	return fmt.Errorf("%w: network %q", ErrNotLocalEndpoint, e.Network)
}

// URI is the endpoint as a QEMU migration URI for libvirt: unix:///path or tcp://ip:port.
func (e Endpoint) URI() string {
	if e.Network == "unix" {
		return "unix://" + e.Address
	}
	return "tcp://" + e.Address
}

// String returns the endpoint as a URI.
func (e Endpoint) String() string { return e.URI() }

// Listener is the source agent's end of a source hypervisor's migration stream.
type Listener struct {
	ln net.Listener
	ep Endpoint
}

// ListenEndpoint listens on e for the source hypervisor's migration connection. A stale unix
// socket file at e is replaced; the socket is made accessible to its owner only.
func ListenEndpoint(ctx context.Context, e Endpoint) (*Listener, error) {
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("listening for migration stream: %w", err)
	}
	if e.Network == "unix" {
		if err := os.Remove(e.Address); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing stale socket %s: %w", e.Address, err)
		}
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, e.Network, e.Address)
	if err != nil {
		return nil, fmt.Errorf("listening for migration stream on %s: %w", e, err)
	}
	if e.Network == "unix" {
		if err := os.Chmod(e.Address, 0o600); err != nil {
			ln.Close()
			return nil, fmt.Errorf("restricting socket %s: %w", e.Address, err)
		}
	} else {
		e.Address = ln.Addr().String()
	}
	return &Listener{ln: ln, ep: e}, nil
}

// Endpoint is where the listener listens; pass it to Source.Perform.
func (l *Listener) Endpoint() Endpoint { return l.ep }

// Accept waits for the hypervisor's connection. The connection supports CloseWrite.
func (l *Listener) Accept(ctx context.Context) (net.Conn, error) {
	stop := context.AfterFunc(ctx, func() { l.ln.Close() })
	defer stop()
	c, err := l.ln.Accept()
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("accepting migration stream on %s: %w", l.ep, err)
	}
	return c, nil
}

// Close stops listening and removes a unix socket file.
func (l *Listener) Close() error { return l.ln.Close() }

// DialEndpoint connects the destination agent to the destination hypervisor's listener at e
// (after Prepare). The connection supports CloseWrite.
func DialEndpoint(ctx context.Context, e Endpoint) (net.Conn, error) {
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("dialing migration endpoint: %w", err)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, e.Network, e.Address)
	if err != nil {
		return nil, fmt.Errorf("dialing migration endpoint %s: %w", e, err)
	}
	// A unix socket's queue is bounded by its sender's buffer, by default about 200 KiB:
	// a larger one lets the agent hand over what it received while the hypervisor is still
	// loading what came before (the kernel caps it at net.core.wmem_max).
	if uc, ok := c.(*net.UnixConn); ok {
		_ = uc.SetWriteBuffer(hypervisorBuffer)
	}
	return c, nil
}

// hypervisorBuffer is the send buffer the destination agent asks for towards its hypervisor.
const hypervisorBuffer = 4 << 20

// SpliceResult counts what Splice copied.
type SpliceResult struct {
	// AToB and BToA are the bytes copied in each direction.
	AToB, BToA int64
}

// Splice copies a to b and b to a until both directions have ended, passing each end of
// input on as a half-close (CloseWrite where the other side has it, else Close). It returns
// the first copy error, after closing both sides; on success both are closed too. If ctx ends
// first, both are closed and ctx's error returned.
//
// It is how a test relay (or any plain carrier) joins the two local endpoints; the agents'
// encrypted transport takes the place of one of the sides.
func Splice(ctx context.Context, a, b io.ReadWriteCloser) (SpliceResult, error) {
	var (
		res      SpliceResult
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	closeBoth := func() { a.Close(); b.Close() }
	fail := func(err error) {
		once.Do(func() { firstErr = err; closeBoth() })
	}
	stop := context.AfterFunc(ctx, func() { fail(ctx.Err()) })
	defer stop()
	pipe := func(dst io.ReadWriteCloser, src io.Reader, n *int64) {
		defer wg.Done()
		var err error
		*n, err = io.Copy(dst, src)
		if err != nil {
			fail(fmt.Errorf("splicing migration stream: %w", err))
			return
		}
		if err := closeWrite(dst); err != nil {
			fail(fmt.Errorf("passing on half-close: %w", err))
		}
	}
	wg.Add(2)
	go pipe(b, a, &res.AToB)
	go pipe(a, b, &res.BToA)
	wg.Wait()
	once.Do(closeBoth)
	return res, firstErr
}

func closeWrite(c io.Closer) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}
