// Package libvirttest is an in-memory hypervisor for tests of the agent's libvirt driver.
//
// A Hypervisor stands for one host's libvirtd: it has the methods of libvirt.Conn,
// libvirt.Source, libvirt.Destination and libvirt.Listener that the agent calls, keeps its
// domains in memory, and moves a domain's memory as the migration stream over in-memory
// connections that support half-close, so that whatever carries the stream between the
// two hosts (the agents' data plane) carries real bytes. It checks that each step gets the
// previous step's cookie, records every migration step it is asked for (Calls), and fails,
// hangs or leaves a domain paused at the step a test scripts (Script).
//
// The streams follow QEMU's shape: the source hypervisor sends the domain's memory and
// half-closes; the destination hypervisor, having read it all, answers with a short
// acknowledgement on the return path and closes; Perform returns once it has the
// acknowledgement, with the guest paused at the source. Finish resumes the guest at the destination with the memory
// it received; Confirm ends it at the source, or resumes it there when cancelled.
//
// It starts no libvirtd or QEMU and proves nothing about them: the real driver is tested
// against libvirtd by the libvirt-tagged tests. It is for tests only and must never be
// linked into a binary.
package libvirttest

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/migagent/libvirt"
)

// Step names a migration step, or another call that changes a domain.
type Step string

// The steps a Hypervisor records and can be scripted to fail.
const (
	StepBegin         Step = "Begin"
	StepPrepare       Step = "Prepare"
	StepPerform       Step = "Perform"
	StepFinish        Step = "Finish"
	StepConfirm       Step = "Confirm"
	StepRemove        Step = "Remove"
	StepStartPostCopy Step = "StartPostCopy"
)

// Ack is what a destination hypervisor sends back on the return path once it has read the
// whole stream; Perform fails unless it receives exactly this.
const Ack = "loaded"

// Call is one recorded step.
type Call struct {
	Step   Step
	Domain string
	// Cancelled is the cancelled argument of Finish and Confirm.
	Cancelled bool
}

// Fault scripts how one step goes wrong. The zero value is no fault.
type Fault struct {
	// Err, if not nil, is the step's error. Perform returns it after sending AfterBytes of
	// the stream, and the guest runs on; Finish (not cancelled) returns it leaving the
	// incoming domain paused; Confirm (not cancelled) returns it leaving the guest paused at
	// the source. Cancelled Finish and Confirm ignore it.
	Err error
	// Hang makes the step block (Perform after sending AfterBytes) until its ctx ends, and
	// then fail with an error wrapping ctx's. Hung tells when it started to block.
	Hang bool
	// AfterBytes is how much of the stream Perform sends before Err or Hang.
	AfterBytes int
	// Paused makes Finish (not cancelled) leave the domain paused instead of resuming it,
	// and Confirm (cancelled) leave the guest paused at the source; both then return an
	// error wrapping libvirt.ErrNotRunning, as the real ones do.
	Paused bool
	// KeepOpen makes the destination hypervisor of a Prepare keep its connection open after
	// its acknowledgement instead of closing it.
	KeepOpen bool
}

// Hypervisor is one host's in-memory hypervisor. Its methods are safe for concurrent use.
type Hypervisor struct {
	mu        sync.Mutex
	domains   map[string]*domain
	listeners map[string]*Listener
	faults    map[Step]Fault
	hung      map[Step]chan struct{}
	calls     []Call
	begun     []libvirt.Settings
	closed    chan struct{}
	closeOnce sync.Once
}

type domain struct {
	state    libvirt.State
	memory   []byte
	metadata string
	sent     int // bytes of the stream Perform sent
}

// New returns a hypervisor without domains.
func New() *Hypervisor {
	return &Hypervisor{
		domains: map[string]*domain{}, listeners: map[string]*Listener{},
		faults: map[Step]Fault{}, hung: map[Step]chan struct{}{}, closed: make(chan struct{}),
	}
}

// Define adds a running domain called name with the given memory and metadata (the content
// of its <metadata> element), replacing any domain of that name.
func (h *Hypervisor) Define(name string, memory []byte, metadata string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.domains[name] = &domain{state: libvirt.StateRunning, memory: bytes.Clone(memory), metadata: metadata}
}

// DomainState is a domain as a test sees it.
type DomainState struct {
	State  libvirt.State
	Memory []byte
}

// Domain returns the domain called name, and false if there is none.
func (h *Hypervisor) Domain(name string) (DomainState, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[name]
	if d == nil {
		return DomainState{}, false
	}
	return DomainState{State: d.state, Memory: bytes.Clone(d.memory)}, true
}

// Script makes every later call of step go wrong as f says.
func (h *Hypervisor) Script(step Step, f Fault) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.faults[step] = f
}

// Hung returns a channel that is closed once a call of step scripted to hang blocks.
func (h *Hypervisor) Hung(step Step) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.hungLocked(step)
}

func (h *Hypervisor) hungLocked(step Step) chan struct{} {
	c := h.hung[step]
	if c == nil {
		c = make(chan struct{})
		h.hung[step] = c
	}
	return c
}

// BegunSettings returns the settings of every Begin so far, in order.
func (h *Hypervisor) BegunSettings() []libvirt.Settings {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.begun)
}

// Calls returns the steps recorded so far, in order.
func (h *Hypervisor) Calls() []Call {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.calls)
}

// record records a call of step and returns its fault.
func (h *Hypervisor) record(step Step, name string, cancelled bool) Fault {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, Call{Step: step, Domain: name, Cancelled: cancelled})
	return h.faults[step]
}

// hang blocks until ctx ends and returns an error wrapping ctx's.
func (h *Hypervisor) hang(ctx context.Context, step Step, name string) error {
	h.mu.Lock()
	c := h.hungLocked(step)
	select {
	case <-c:
	default:
		close(c)
	}
	h.mu.Unlock()
	<-ctx.Done()
	return fmt.Errorf("%s of domain %s: %w", step, name, context.Cause(ctx))
}

// Disconnect ends the hypervisor's connection: Disconnected's channel is closed.
func (h *Hypervisor) Disconnect() { h.closeOnce.Do(func() { close(h.closed) }) }

// Disconnected is closed once the connection is lost or closed.
func (h *Hypervisor) Disconnected() <-chan struct{} { return h.closed }

// Close closes the connection.
func (h *Hypervisor) Close() error {
	h.Disconnect()
	return nil
}

// Domains lists the domains, by name.
func (h *Hypervisor) Domains(ctx context.Context) ([]libvirt.Domain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("listing domains: %w", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []libvirt.Domain
	for _, name := range slices.Sorted(maps.Keys(h.domains)) {
		d := h.domains[name]
		out = append(out, libvirt.Domain{Name: name, State: d.state, Persistent: true, MemoryBytes: uint64(len(d.memory))})
	}
	return out, nil
}

// Metadata returns the metadata of the domain called name (whatever the namespace). It
// returns libvirt.ErrDomainNotFound if there is none.
func (h *Hypervisor) Metadata(ctx context.Context, name, namespace string) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[name]
	if d == nil {
		return "", fmt.Errorf("reading metadata of domain %s: %w", name, libvirt.ErrDomainNotFound)
	}
	return d.metadata, nil
}

// JobStats reads the migration job of the domain called name: the bytes Perform sent of
// its memory. It returns libvirt.ErrDomainNotFound if there is none.
func (h *Hypervisor) JobStats(ctx context.Context, name string, completed bool) (libvirt.Progress, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[name]
	if d == nil {
		return libvirt.Progress{}, fmt.Errorf("reading job statistics of domain %s: %w", name, libvirt.ErrDomainNotFound)
	}
	job := libvirt.JobUnbounded
	if completed {
		job = libvirt.JobCompleted
	}
	return libvirt.Progress{Job: job, DataTotal: uint64(len(d.memory)), DataProcessed: uint64(d.sent), Iteration: 1}, nil
}

// Remove stops and undefines the domain called name; one that does not exist is not an
// error.
func (h *Hypervisor) Remove(ctx context.Context, name string) error {
	h.record(StepRemove, name, false)
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.domains, name)
	return nil
}

// Begin starts migrating the domain called name away. It returns libvirt.ErrDomainNotFound
// if there is none, and an error if it does not run.
func (h *Hypervisor) Begin(ctx context.Context, name string, s libvirt.Settings) (*Source, libvirt.Offer, error) {
	f := h.record(StepBegin, name, false)
	if f.Hang {
		return nil, libvirt.Offer{}, h.hang(ctx, StepBegin, name)
	}
	if f.Err != nil {
		return nil, libvirt.Offer{}, f.Err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.begun = append(h.begun, s)
	d := h.domains[name]
	switch {
	case d == nil:
		return nil, libvirt.Offer{}, fmt.Errorf("beginning migration of domain %s: %w", name, libvirt.ErrDomainNotFound)
	case d.state != libvirt.StateRunning:
		return nil, libvirt.Offer{}, fmt.Errorf("beginning migration of domain %s: %s", name, d.state)
	}
	var x bytes.Buffer
	x.WriteString("<domain><name>")
	xml.EscapeText(&x, []byte(name))
	x.WriteString("</name><metadata>" + d.metadata + "</metadata></domain>")
	offer := libvirt.Offer{Domain: name, XML: x.String(), Cookie: cookie(StepBegin, name), Bandwidth: s.Bandwidth}
	return &Source{h: h, name: name, settings: s}, offer, nil
}

// cookie is the cookie step returns for the domain called name.
func cookie(step Step, name string) []byte { return []byte(string(step) + ":" + name) }

// checkCookie checks that got is the cookie of the step before.
func checkCookie(step, prev Step, name string, got []byte) error {
	if !bytes.Equal(got, cookie(prev, name)) {
		return fmt.Errorf("%s of domain %s: cookie %q is not %s's", step, name, got, prev)
	}
	return nil
}

// Listen opens the endpoint ep for a hypervisor on this host to send a stream to.
func (h *Hypervisor) Listen(ctx context.Context, ep libvirt.Endpoint) (*Listener, error) {
	if err := ep.Validate(); err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.listeners[ep.Address] != nil {
		return nil, fmt.Errorf("listening on %s: address in use", ep)
	}
	l := &Listener{h: h, ep: ep, conns: make(chan net.Conn, 1), closed: make(chan struct{})}
	h.listeners[ep.Address] = l
	return l, nil
}

// Dial connects to the listener on ep.
func (h *Hypervisor) Dial(ctx context.Context, ep libvirt.Endpoint) (net.Conn, error) {
	c, err := h.dial(ctx, ep)
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (h *Hypervisor) dial(ctx context.Context, ep libvirt.Endpoint) (*conn, error) {
	h.mu.Lock()
	l := h.listeners[ep.Address]
	h.mu.Unlock()
	if l == nil {
		return nil, fmt.Errorf("dialing %s: nothing listens there", ep)
	}
	a, b := pipe(ep)
	select {
	case l.conns <- b:
		return a, nil
	case <-l.closed:
		return nil, fmt.Errorf("dialing %s: %w", ep, net.ErrClosed)
	case <-ctx.Done():
		return nil, fmt.Errorf("dialing %s: %w", ep, ctx.Err())
	}
}

// Listener is an endpoint on the hypervisor's host that a stream is sent to.
type Listener struct {
	h      *Hypervisor
	ep     libvirt.Endpoint
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

// Accept waits for a connection to the endpoint.
func (l *Listener) Accept(ctx context.Context) (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, fmt.Errorf("accepting on %s: %w", l.ep, net.ErrClosed)
	case <-ctx.Done():
		return nil, fmt.Errorf("accepting on %s: %w", l.ep, ctx.Err())
	}
}

// Endpoint is where the listener listens.
func (l *Listener) Endpoint() libvirt.Endpoint { return l.ep }

// Close stops listening.
func (l *Listener) Close() error {
	l.once.Do(func() {
		close(l.closed)
		l.h.mu.Lock()
		if l.h.listeners[l.ep.Address] == l {
			delete(l.h.listeners, l.ep.Address)
		}
		l.h.mu.Unlock()
	})
	return nil
}

// Source is the source side of one migration.
type Source struct {
	h        *Hypervisor
	name     string
	settings libvirt.Settings

	mu         sync.Mutex
	performing bool
}

// Perform sends the domain's memory to the endpoint to and waits for the destination
// hypervisor's acknowledgement; it then pauses the guest and returns the cookie for Finish. If ctx ends first the stream is cut and the guest runs on.
func (s *Source) Perform(ctx context.Context, accepted libvirt.Accepted, to libvirt.Endpoint) ([]byte, error) {
	h := s.h
	f := h.record(StepPerform, s.name, false)
	if err := checkCookie(StepPerform, StepPrepare, s.name, accepted.Cookie); err != nil {
		return nil, err
	}
	h.mu.Lock()
	d := h.domains[s.name]
	if d == nil {
		h.mu.Unlock()
		return nil, fmt.Errorf("performing migration of domain %s: %w", s.name, libvirt.ErrDomainNotFound)
	}
	memory := d.memory
	h.mu.Unlock()
	c, err := h.dial(ctx, to)
	if err != nil {
		return nil, fmt.Errorf("performing migration of domain %s: %w", s.name, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	s.mu.Lock()
	s.performing = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.performing = false
		s.mu.Unlock()
	}()

	send := len(memory)
	if f.Err != nil || f.Hang {
		send = min(f.AfterBytes, send)
	}
	const chunk = 64 << 10
	for off := 0; off < send; off += chunk {
		n, err := c.Write(memory[off:min(off+chunk, send)])
		h.mu.Lock()
		d.sent += n
		h.mu.Unlock()
		if err != nil {
			return nil, s.failed(ctx, err)
		}
	}
	switch {
	case f.Hang:
		return nil, h.hang(ctx, StepPerform, s.name)
	case f.Err != nil:
		return nil, f.Err
	}
	if err := c.CloseWrite(); err != nil {
		return nil, s.failed(ctx, err)
	}
	back := make([]byte, len(Ack))
	if _, err := io.ReadFull(c, back); err != nil {
		return nil, s.failed(ctx, err)
	}
	if string(back) != Ack {
		return nil, fmt.Errorf("performing migration of domain %s: the destination answered %q, not %q", s.name, back, Ack)
	}
	h.mu.Lock()
	d.state = libvirt.StatePaused
	h.mu.Unlock()
	return cookie(StepPerform, s.name), nil
}

// failed is Perform's error for a broken stream: ctx's, if it ended.
func (s *Source) failed(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		err = errors.Join(ctx.Err(), err)
	}
	return fmt.Errorf("performing migration of domain %s: %w", s.name, err)
}

// Progress reads the running job: the bytes sent so far, in iteration 1.
func (s *Source) Progress(ctx context.Context) (libvirt.Progress, error) {
	s.mu.Lock()
	running := s.performing
	s.mu.Unlock()
	p, err := s.h.JobStats(ctx, s.name, false)
	if !running {
		p.Job = libvirt.JobNone
	}
	return p, err
}

// StartPostCopy records the switch to post-copy; it fails unless the settings allow it.
func (s *Source) StartPostCopy(ctx context.Context) error {
	s.h.record(StepStartPostCopy, s.name, false)
	if !s.settings.PostCopy {
		return fmt.Errorf("starting post-copy of domain %s: post-copy was not allowed", s.name)
	}
	return nil
}

// Confirm ends the migration at the source. Not cancelled, it checks Finish's cookie and
// removes the domain; cancelled, it resumes the guest.
func (s *Source) Confirm(ctx context.Context, c []byte, cancelled bool) error {
	h := s.h
	f := h.record(StepConfirm, s.name, cancelled)
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[s.name]
	if d == nil {
		return fmt.Errorf("confirming migration of domain %s: %w", s.name, libvirt.ErrDomainNotFound)
	}
	if cancelled {
		if f.Paused {
			return fmt.Errorf("checking domain %s after cancelled migration: %s: %w", s.name, d.state, libvirt.ErrNotRunning)
		}
		d.state = libvirt.StateRunning
		return nil
	}
	if f.Err != nil {
		return f.Err
	}
	if err := checkCookie(StepConfirm, StepFinish, s.name, c); err != nil {
		return err
	}
	delete(h.domains, s.name)
	return nil
}

// Prepare defines the offered domain, paused, and listens on listen for its stream: the
// destination hypervisor reads the stream to its end, answers with Ack and closes.
func (h *Hypervisor) Prepare(ctx context.Context, offer libvirt.Offer, listen libvirt.Endpoint) (*Destination, libvirt.Accepted, error) {
	f := h.record(StepPrepare, offer.Domain, false)
	if f.Hang {
		return nil, libvirt.Accepted{}, h.hang(ctx, StepPrepare, offer.Domain)
	}
	if f.Err != nil {
		return nil, libvirt.Accepted{}, f.Err
	}
	if err := checkCookie(StepPrepare, StepBegin, offer.Domain, offer.Cookie); err != nil {
		return nil, libvirt.Accepted{}, err
	}
	ln, err := h.Listen(ctx, listen)
	if err != nil {
		return nil, libvirt.Accepted{}, fmt.Errorf("preparing incoming migration of domain %s: %w", offer.Domain, err)
	}
	h.mu.Lock()
	if h.domains[offer.Domain] != nil {
		h.mu.Unlock()
		ln.Close()
		return nil, libvirt.Accepted{}, fmt.Errorf("preparing incoming migration of domain %s: domain exists", offer.Domain)
	}
	h.domains[offer.Domain] = &domain{state: libvirt.StatePaused, metadata: metadataOf(offer.XML)}
	h.mu.Unlock()
	dst := &Destination{h: h, name: offer.Domain, ln: ln, keepOpen: f.KeepOpen, loaded: make(chan struct{})}
	go dst.load()
	return dst, libvirt.Accepted{Cookie: cookie(StepPrepare, offer.Domain)}, nil
}

// metadataOf is the content of the metadata element of a domain XML from Begin.
func metadataOf(x string) string {
	_, after, _ := bytes.Cut([]byte(x), []byte("<metadata>"))
	before, _, _ := bytes.Cut(after, []byte("</metadata>"))
	return string(before)
}

// Destination is the destination side of one migration.
type Destination struct {
	h        *Hypervisor
	name     string
	ln       *Listener
	keepOpen bool
	loaded   chan struct{} // closed when load ended
	memory   []byte
	err      error
}

// load is the destination hypervisor: it reads the stream to its end, answers and closes.
func (d *Destination) load() {
	defer close(d.loaded)
	defer d.ln.Close()
	c, err := d.ln.Accept(context.Background())
	if err != nil {
		d.err = err
		return
	}
	if !d.keepOpen {
		defer c.Close()
	}
	if d.memory, d.err = io.ReadAll(c); d.err != nil {
		return
	}
	if _, err := io.WriteString(c, Ack); err != nil {
		d.err = err
	}
}

// Finish ends the incoming migration. Not cancelled, it checks Perform's cookie and that the
// whole stream arrived, gives the domain the memory received and resumes it; cancelled, it
// removes the domain.
func (d *Destination) Finish(ctx context.Context, c []byte, cancelled bool) ([]byte, error) {
	h := d.h
	f := h.record(StepFinish, d.name, cancelled)
	if cancelled {
		d.ln.Close()
		h.mu.Lock()
		delete(h.domains, d.name)
		h.mu.Unlock()
		return nil, nil
	}
	if f.Hang {
		return nil, h.hang(ctx, StepFinish, d.name)
	}
	if f.Err != nil {
		return nil, f.Err
	}
	if err := checkCookie(StepFinish, StepPerform, d.name, c); err != nil {
		return nil, err
	}
	select {
	case <-d.loaded:
	default:
		return nil, fmt.Errorf("finishing incoming migration of domain %s: the stream has not ended", d.name)
	}
	if d.err != nil {
		return nil, fmt.Errorf("finishing incoming migration of domain %s: %w", d.name, d.err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	dom := h.domains[d.name]
	if dom == nil {
		return nil, fmt.Errorf("finishing incoming migration of domain %s: %w", d.name, libvirt.ErrDomainNotFound)
	}
	dom.memory = d.memory
	if f.Paused {
		return nil, fmt.Errorf("checking migrated domain %s: %s: %w", d.name, dom.state, libvirt.ErrNotRunning)
	}
	dom.state = libvirt.StateRunning
	return cookie(StepFinish, d.name), nil
}

// conn is one end of an in-memory connection with half-close.
type conn struct {
	r  *io.PipeReader
	w  *io.PipeWriter
	ep libvirt.Endpoint
}

// pipe returns the two ends of a connection to ep.
func pipe(ep libvirt.Endpoint) (*conn, *conn) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &conn{r: ar, w: aw, ep: ep}, &conn{r: br, w: bw, ep: ep}
}

func (c *conn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *conn) Write(p []byte) (int, error) { return c.w.Write(p) }

// CloseWrite ends this end's direction: the peer reads io.EOF.
func (c *conn) CloseWrite() error { return c.w.Close() }

// Close closes both directions: the peer reads io.EOF and its writes fail.
func (c *conn) Close() error {
	c.r.Close()
	return c.w.Close()
}

func (c *conn) LocalAddr() net.Addr  { return addr{c.ep.Network, c.ep.Address} }
func (c *conn) RemoteAddr() net.Addr { return addr{c.ep.Network, c.ep.Address} }

// SetDeadline and its kin are not supported: the agent's driver sets no deadlines.
func (c *conn) SetDeadline(time.Time) error      { return errors.ErrUnsupported }
func (c *conn) SetReadDeadline(time.Time) error  { return errors.ErrUnsupported }
func (c *conn) SetWriteDeadline(time.Time) error { return errors.ErrUnsupported }

type addr struct{ network, address string }

func (a addr) Network() string { return a.network }
func (a addr) String() string  { return a.address }
