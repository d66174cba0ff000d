package migagent

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
	"github.com/lethe-cc/lethe/migagent/libvirt"
)

// Libvirt guests.
//
// With LibvirtConfig.Socket set, the node's guests are its host's libvirt domains instead of
// in-process regions: every running domain that names its guest in its metadata, or every
// running domain when LibvirtConfig.Tenant is set, is listed in the host record, and every
// migration into the host is a libvirt migration. The guest's tenant and VM name come from
// an element in the domain's <metadata>:
//
//	<metadata>
//	  <lethe:guest xmlns:lethe="https://lethe.dev/xmlns/libvirt/guest/1" tenant="acme" vm="web"/>
//	</metadata>
//
// (vm defaults to the domain name); a domain without it belongs to LibvirtConfig.Tenant, if
// set, under its domain name, and is not a Lethe guest otherwise. The metadata moves with the
// domain, so the destination checks that the offered domain is the guest the keys were
// released for.
//
// A libvirt migration is the data plane in byte-stream mode (one stream, no region), carrying
// the tunnel records of libvirt_tunnel.go: the source agent runs Begin and sends the offer
// in-band; the destination agent runs Prepare with a unix endpoint in MigrateDir, answers
// with the cookie and feeds the stream to the destination hypervisor; the source runs Perform
// towards its own unix endpoint and carries what it accepts there. The destination runs
// Finish, which checks the guest runs, before it ends its direction of the stream; the data
// plane acknowledges the commit only after both directions ended, and the source then runs
// Confirm, which checks the guest is gone from the source. On any failure before the
// acknowledgement the destination cancels Finish (or destroys the domain Finish resumed) and
// the source cancels Confirm, so the guest runs on at the source.
//
// There is no memory digest: the data plane does not see the guest's pages, only the
// hypervisor's stream, whose integrity it protects frame by frame. The source's erasure is
// the zeroization of TK and MDK; the hypervisor's memory of the guest is released by libvirt
// when Confirm ends the source's QEMU process, not scrubbed by the agent. A destination
// cannot state that its receive memory is clean (the hypervisor's fresh memory is zeroed by
// the host kernel, which the agent does not verify): its clean-memory statement says zeroed
// false, and adoption evidence has none, so a policy that requires the statement
// (destination.clean.requireStatement, on by default) denies libvirt guests.

// GuestMetadataNamespace is the XML namespace of the guest element in a libvirt domain's
// metadata.
const GuestMetadataNamespace = "https://lethe.dev/xmlns/libvirt/guest/1"

// LibvirtConfig makes a node drive its host's libvirtd. The zero value means no libvirt.
type LibvirtConfig struct {
	// Socket is libvirtd's read-write unix socket. Empty means no libvirt guests.
	Socket string
	// MigrateDir is the directory of the unix sockets between the agent and the hypervisor
	// (one per migration and side); only the agent and the hypervisor may reach it, and it
	// must be the same path for both. Empty means /run/lethe-agent/migrate.
	MigrateDir string
	// Tenant is the tenant of running domains without the guest element in their metadata.
	// Empty means such domains are not guests.
	Tenant string
	// Settings tune the migrations the node sends: max downtime, bandwidth, auto-converge,
	// post-copy (with PostCopy the agent switches a migration whose grant allows it to
	// post-copy after PostCopyAfter pre-copy iterations; a failure after the switch loses
	// the guest), multifd channels (Parallel, also the most a migration here may bring).
	Settings libvirt.Settings
	// PostCopyAfter is the pre-copy iteration after which a migration that allows
	// post-copy switches to it. Zero means 3.
	PostCopyAfter uint64
	// PollInterval is the time between refreshes of the domain list. Zero means the heartbeat
	// interval.
	PollInterval time.Duration
	// ProgressInterval is the time between progress reports of a running migration. Zero
	// means 500 ms.
	ProgressInterval time.Duration
}

// hypervisor is the agent's view of its host's libvirtd: the domains it lists as guests,
// and the two sides of a migration. libvirtConn is the real one; the tests drive the same
// code with the in-memory hypervisor of package libvirt/libvirttest.
type hypervisor interface {
	domainLister
	sourceHypervisor
	destinationHypervisor
}

// domainLister is what the node reads its guests from.
type domainLister interface {
	Domains(ctx context.Context) ([]libvirt.Domain, error)
	Metadata(ctx context.Context, domain, namespace string) (string, error)
	// Disconnected is closed when the connection to the hypervisor is lost.
	Disconnected() <-chan struct{}
	Close() error
}

// sourceHypervisor is the source host's side of a migration: Begin, then the migration
// stream to a local endpoint the agent listens on, and Remove for a domain that Confirm
// failed to end.
type sourceHypervisor interface {
	Begin(ctx context.Context, domain string, s libvirt.Settings) (sourceMigration, libvirt.Offer, error)
	Listen(ctx context.Context, ep libvirt.Endpoint) (streamListener, error)
	JobStats(ctx context.Context, domain string, completed bool) (libvirt.Progress, error)
	Remove(ctx context.Context, domain string) error
}

// sourceMigration is one begun migration at the source (libvirt.Source): after Begin it
// must end with Confirm, cancelled if anything failed.
type sourceMigration interface {
	Perform(ctx context.Context, accepted libvirt.Accepted, to libvirt.Endpoint) ([]byte, error)
	Confirm(ctx context.Context, cookie []byte, cancelled bool) error
	Progress(ctx context.Context) (libvirt.Progress, error)
	StartPostCopy(ctx context.Context) error
}

// streamListener is the source agent's endpoint that the source hypervisor sends its
// migration stream to (libvirt.Listener).
type streamListener interface {
	Accept(ctx context.Context) (net.Conn, error)
	Endpoint() libvirt.Endpoint
	Close() error
}

// destinationHypervisor is the destination host's side of a migration: Prepare, the
// connection to the hypervisor's listener that the agent feeds, and Remove for a domain
// that Finish resumed in a migration that then failed.
type destinationHypervisor interface {
	Prepare(ctx context.Context, offer libvirt.Offer, listen libvirt.Endpoint) (destinationMigration, libvirt.Accepted, error)
	Dial(ctx context.Context, ep libvirt.Endpoint) (net.Conn, error)
	Remove(ctx context.Context, domain string) error
}

// destinationMigration is one prepared migration at the destination (libvirt.Destination):
// after Prepare it must end with Finish, cancelled if anything failed.
type destinationMigration interface {
	Finish(ctx context.Context, cookie []byte, cancelled bool) ([]byte, error)
}

// libvirtConn is the hypervisor on a connection to libvirtd.
type libvirtConn struct{ *libvirt.Conn }

func (c libvirtConn) Begin(ctx context.Context, domain string, s libvirt.Settings) (sourceMigration, libvirt.Offer, error) {
	src, offer, err := c.Conn.Begin(ctx, domain, s)
	if err != nil {
		return nil, libvirt.Offer{}, err
	}
	return src, offer, nil
}

func (c libvirtConn) Prepare(ctx context.Context, offer libvirt.Offer, listen libvirt.Endpoint) (destinationMigration, libvirt.Accepted, error) {
	dst, acc, err := c.Conn.Prepare(ctx, offer, listen)
	if err != nil {
		return nil, libvirt.Accepted{}, err
	}
	return dst, acc, nil
}

func (libvirtConn) Listen(ctx context.Context, ep libvirt.Endpoint) (streamListener, error) {
	ln, err := libvirt.ListenEndpoint(ctx, ep)
	if err != nil {
		return nil, err
	}
	return ln, nil
}

func (libvirtConn) Dial(ctx context.Context, ep libvirt.Endpoint) (net.Conn, error) {
	return libvirt.DialEndpoint(ctx, ep)
}

// lvMigration is the libvirt side of a migration, guarded by the migration's mu.
type lvMigration struct {
	tun *tunnel
	// src is the begun migration at the source, kept after a transfer whose outcome is
	// unknown so that an abort can cancel it (resuming the guest).
	src sourceMigration
	// settings are the source's settings for this transfer (sourceSettings): the agent's,
	// held to the transfer's downtime limit, post-copy only where the grant allows it.
	settings libvirt.Settings
}

// memoryBytes is the guest's memory size.
func (g *guest) memoryBytes() int64 {
	if g.region != nil {
		return g.region.Size()
	}
	return g.memory
}

// MaxParallel is the most multifd channels a libvirt migration may use.
const MaxParallel = 16

// checkLibvirt validates cfg.Libvirt and fills in its defaults.
func checkLibvirt(cfg *Config) error {
	lc := &cfg.Libvirt
	if lc.Socket == "" {
		return nil
	}
	if len(cfg.Guests) > 0 {
		return errors.New("a node with libvirt holds only libvirt guests: configure no other guests")
	}
	if lc.Tenant != "" {
		if err := agentapi.ValidName(lc.Tenant); err != nil {
			return fmt.Errorf("libvirt tenant: %w", err)
		}
	}
	lc.MigrateDir = cmp.Or(lc.MigrateDir, "/run/lethe-agent/migrate")
	if !filepath.IsAbs(lc.MigrateDir) {
		return fmt.Errorf("libvirt migrate dir %q is not absolute", lc.MigrateDir)
	}
	if lc.Settings.Parallel < 0 || lc.Settings.Parallel > MaxParallel {
		return fmt.Errorf("libvirt parallel connections %d: want 0 to %d", lc.Settings.Parallel, MaxParallel)
	}
	if lc.PostCopyAfter == 0 {
		lc.PostCopyAfter = 3
	}
	if lc.PollInterval <= 0 {
		lc.PollInterval = cfg.HeartbeatInterval
	}
	if lc.ProgressInterval <= 0 {
		lc.ProgressInterval = 500 * time.Millisecond
	}
	return nil
}

// startLibvirt connects to libvirtd and lists its guests, if the node drives libvirt.
func (n *Node) startLibvirt(ctx context.Context) error {
	lc := n.cfg.Libvirt
	if lc.Socket == "" {
		return nil
	}
	if err := os.MkdirAll(lc.MigrateDir, 0o700); err != nil {
		return fmt.Errorf("making the migration socket directory: %w", err)
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lc.Socket, Logger: n.log})
	if err != nil {
		return err
	}
	n.lv = libvirtConn{conn}
	if err := n.syncDomains(ctx); err != nil {
		conn.Close()
		n.lv = nil
		return err
	}
	return nil
}

// closeLibvirt disconnects from libvirtd.
func (n *Node) closeLibvirt() {
	if n.lv == nil {
		return
	}
	if err := n.lv.Close(); err != nil {
		n.log.Warn("Disconnecting from libvirtd failed", attrError, err)
	}
}

// watchLibvirt refreshes the guests from the domain list until ctx ends. It returns an error
// if the connection to libvirtd is lost.
func (n *Node) watchLibvirt(ctx context.Context) error {
	if n.lv == nil {
		return nil
	}
	t := time.NewTicker(n.cfg.Libvirt.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-n.lv.Disconnected():
			return errors.New("lost the connection to libvirtd")
		case <-t.C:
		}
		if err := n.syncDomains(ctx); err != nil && ctx.Err() == nil {
			n.log.Warn("Listing libvirt domains failed", attrError, err)
		}
	}
}

// domainGuest is a running domain that is a guest.
type domainGuest struct {
	tenant, vm, domain string
	memory             int64
}

// syncDomains makes the node's guests the host's running guest domains: it adds new ones
// (not those arriving in a migration) and forgets those gone that are not migrating.
func (n *Node) syncDomains(ctx context.Context) error {
	doms, err := n.lv.Domains(ctx)
	if err != nil {
		return err
	}
	found := map[string]domainGuest{}
	for _, d := range doms {
		if !d.State.Active() {
			continue
		}
		md, err := n.lv.Metadata(ctx, d.Name, GuestMetadataNamespace)
		if errors.Is(err, libvirt.ErrDomainNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		tenant, vm, ok := n.identify(md, d.Name, true)
		if !ok {
			continue
		}
		found[guestKey(tenant, vm)] = domainGuest{tenant: tenant, vm: vm, domain: d.Name, memory: int64(d.MemoryBytes)}
	}
	n.mu.Lock()
	changed := false
	for key, dg := range found {
		if n.guests[key] != nil || n.moving(dg.tenant, dg.vm) {
			continue
		}
		n.guests[key] = &guest{tenant: dg.tenant, vm: dg.vm, domain: dg.domain, memory: dg.memory}
		n.log.Info("Found libvirt guest", attrTenant, dg.tenant, attrVM, dg.vm, attrDomain, dg.domain)
		changed = true
	}
	for key, g := range n.guests {
		if _, ok := found[key]; ok || g.domain == "" || g.migration != "" {
			continue
		}
		delete(n.guests, key)
		g.mdk.Destroy()
		g.mdk = nil
		n.log.Info("Libvirt guest left the host", attrTenant, g.tenant, attrVM, g.vm, attrDomain, g.domain)
		changed = true
	}
	n.mu.Unlock()
	if changed {
		n.hostChanged()
	}
	return nil
}

// moving reports whether a migration brings the guest here now, or took it away (a domain
// listed before the source's Confirm must not come back as a guest). Callers hold n.mu.
func (n *Node) moving(tenant, vm string) bool {
	if n.arriving(tenant, vm) != nil {
		return true
	}
	for _, m := range n.migs {
		if m.role == attest.RoleSource && m.tenant == tenant && m.vm == vm && m.phase() == phaseCommitted {
			return true
		}
	}
	return false
}

// identify names the guest of a domain from the guest element of its whole domain XML, or
// of the metadata libvirt returned for the namespace (metadata: libvirt strips the
// namespace), else from the configured tenant.
func (n *Node) identify(doc, domain string, metadata bool) (tenant, vm string, ok bool) {
	tenant, vm, found := guestElement(doc, metadata)
	if !found {
		tenant = n.cfg.Libvirt.Tenant
	}
	vm = cmp.Or(vm, domain)
	if tenant == "" || errors.Join(agentapi.ValidName(tenant), agentapi.ValidName(vm)) != nil {
		return "", "", false
	}
	return tenant, vm, true
}

// guestElement finds the guest element in XML: in the agent's namespace, or in any
// namespace with anyNamespace.
func guestElement(doc string, anyNamespace bool) (tenant, vm string, found bool) {
	if doc == "" {
		return "", "", false
	}
	d := xml.NewDecoder(bytes.NewReader([]byte(doc)))
	for {
		tok, err := d.Token()
		if err != nil {
			return "", "", false
		}
		se, ok := tok.(xml.StartElement)
		if !ok || se.Name.Local != "guest" || (!anyNamespace && se.Name.Space != GuestMetadataNamespace) {
			continue
		}
		for _, a := range se.Attr {
			switch a.Name.Local {
			case "tenant":
				tenant = a.Value
			case "vm":
				vm = a.Value
			}
		}
		return tenant, vm, true
	}
}

// GuestMetadata is the metadata element that makes a libvirt domain the guest tenant/vm, to
// put in its <metadata>.
func GuestMetadata(tenant, vm string) string {
	var b bytes.Buffer
	b.WriteString(`<lethe:guest xmlns:lethe="` + GuestMetadataNamespace + `" tenant="`)
	xml.EscapeText(&b, []byte(tenant))
	b.WriteString(`" vm="`)
	xml.EscapeText(&b, []byte(vm))
	b.WriteString(`"/>`)
	return b.String()
}

// socketPath is the unix endpoint of one side of a migration.
func (n *Node) socketPath(id, side string) string {
	return filepath.Join(n.cfg.Libvirt.MigrateDir, id+"."+side+".sock")
}

// --- destination ---

// libvirtBackend holds the host's libvirt domains as guests and moves them by carrying the
// hypervisors' own migration stream through the data plane.
type libvirtBackend struct{ n *Node }

// newDestination makes the data-plane destination of an incoming libvirt migration (byte
// stream only) and its listener.
func (b libvirtBackend) newDestination(req *agentapi.PrepareRequest) (*migration, error) {
	n := b.n
	tun := newTunnel(false)
	cfg := dataplane.DestinationConfig{MigrationID: req.MigrationID, Stream: tun, MaxStreams: 1, Logger: n.log}
	if p := n.cfg.Libvirt.Settings.Parallel; p > 0 {
		// As many multifd channels as this agent would send, and no more: each lane costs
		// the destination its frame and read buffers.
		cfg.Lanes, cfg.MaxStreams = tun.lane, 1+p
	}
	dst, err := dataplane.NewDestination(cfg)
	if err != nil {
		return nil, err
	}
	ln, endpoint, err := n.listen()
	if err != nil {
		return nil, err
	}
	m := newMigration(req.MigrationID, attest.RoleDestination, req.Tenant, req.VM, int64(req.MemoryBytes), phasePrepared)
	m.dst, m.ln, m.endpoint, m.lv = dst, ln, endpoint, &lvMigration{tun: tun}
	m.lanes = n.cfg.Libvirt.Settings.Parallel
	return m, nil
}

// receive runs the destination of a libvirt migration under ctx: the data plane and the
// libvirt steps side by side. After a commit the guest runs here.
func (b libvirtBackend) receive(ctx context.Context, m *migration) {
	n := b.n
	keys := m.takeReceiveKeys()
	dctx, dcancel := context.WithCancel(ctx)
	defer dcancel()
	var (
		d  destinationDriver
		wg sync.WaitGroup
	)
	wg.Go(func() { d.run(dctx, n, m) })
	res, err := m.dst.Receive(ctx, m.ln, keys)
	if err != nil {
		dcancel()
	}
	wg.Wait()
	m.lv.tun.closeLanes()
	if err == nil && !d.finished {
		// The source ended its stream without the steps: nothing runs here to commit to.
		err = fmt.Errorf("the stream ended before the guest ran here: %w", cmp.Or(d.err, errors.New("no performed record")))
		keys.MDK.Destroy()
	}
	if err != nil {
		d.cancel(context.WithoutCancel(ctx), n)
		keys.MDK.Destroy() // Receive does not when it refuses to start
		if res.Erasure == nil {
			// The keys are zeroized; the hypervisor held the guest's memory.
			res.Erasure = &attest.ErasureStatement{Type: attest.StatementErasure, MigrationID: m.id, KeysZeroized: []string{attest.KeyTransfer, attest.KeyMemoryData}}
		}
		n.received(m, nil, &res, err)
		return
	}
	g := &guest{tenant: m.tenant, vm: m.vm, domain: d.domain, memory: m.size, mdk: keys.MDK}
	n.received(m, g, &res, nil)
}

// destinationDriver runs the destination's libvirt steps from the tunnel's records.
type destinationDriver struct {
	dst      destinationMigration
	domain   string
	finished bool // Finish ran and the guest runs here
	tried    bool // Finish (not cancelled) was called
	err      error
}

func (d *destinationDriver) run(ctx context.Context, n *Node, m *migration) {
	tun := m.lv.tun
	stop := context.AfterFunc(ctx, func() { tun.end(context.Cause(ctx)) })
	defer stop()
	d.err = d.steps(ctx, n, m, tun)
	if d.err != nil {
		tun.end(d.err)
	}
}

func (d *destinationDriver) steps(ctx context.Context, n *Node, m *migration, tun *tunnel) error {
	b, err := tun.expect(recOffer)
	if err != nil {
		return fmt.Errorf("receiving the offer: %w", err)
	}
	var offer libvirt.Offer
	if err := json.Unmarshal(b, &offer); err != nil {
		return fmt.Errorf("decoding the offer: %w", err)
	}
	if tenant, vm, ok := n.identify(offer.XML, offer.Domain, false); !ok || tenant != m.tenant || vm != m.vm {
		return fmt.Errorf("checking the offer: domain %q is not guest %s/%s", offer.Domain, m.tenant, m.vm)
	}
	// The session's lanes exist before the offer arrives on stream 0.
	lanes := tun.hvLanes()
	if offer.Parallel != len(lanes) {
		return fmt.Errorf("checking the offer: %d multifd channels over %d lanes", offer.Parallel, len(lanes))
	}
	ep := libvirt.UnixEndpoint(n.socketPath(m.id, "dst"))
	if err := os.Remove(ep.Address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	defer os.Remove(ep.Address)
	dst, acc, err := n.lv.Prepare(ctx, offer, ep)
	if err != nil {
		return err
	}
	d.dst, d.domain = dst, offer.Domain
	if err := tun.send(recAccepted, acc.Cookie); err != nil {
		return err
	}
	hv, err := dialHypervisor(ctx, n.lv, ep)
	if err != nil {
		return err
	}
	defer hv.Close()
	stop := context.AfterFunc(ctx, func() { hv.Close() })
	defer stop()
	// The multifd channels follow the main one, which the hypervisor takes first.
	for i, l := range lanes {
		c, err := dialHypervisor(ctx, n.lv, ep)
		if err != nil {
			return fmt.Errorf("connecting multifd channel %d: %w", i+1, err)
		}
		l.attach(c)
	}
	pumped := make(chan error, 1)
	go func() { pumped <- tun.pumpHypervisor(hv) }()
	var cookie []byte
	for cookie == nil {
		typ, p, err := tun.recv()
		if err != nil {
			return fmt.Errorf("receiving the migration stream: %w", noEOF(err))
		}
		if ok, err := toHypervisor(hv, typ, p); err != nil {
			return err
		} else if ok {
			continue
		}
		if typ != recPerformed {
			return fmt.Errorf("receiving the migration stream: unexpected record %q", typ)
		}
		cookie = p
	}
	// The source's stream is complete. The hypervisor ends its side when it has loaded the
	// guest.
	if err := awaitEnd(tun, hv, pumped); err != nil {
		return err
	}
	d.tried = true
	out, err := dst.Finish(ctx, cookie, false)
	if err != nil {
		return err
	}
	d.finished = true
	tun.finishLanes() // the hypervisor loaded the guest: its channels end now
	if err := tun.send(recFinished, out); err != nil {
		return err
	}
	tun.end(nil)
	return nil
}

// cancel leaves no guest here after a failure: Finish cancelled, or the domain that Finish
// resumed (or failed to) destroyed.
func (d *destinationDriver) cancel(ctx context.Context, n *Node) {
	if d.dst == nil {
		return
	}
	if d.tried {
		if err := n.lv.Remove(ctx, d.domain); err != nil {
			n.log.Error("Removing the domain of a failed migration failed", attrDomain, d.domain, attrError, err)
		}
		return
	}
	if _, err := d.dst.Finish(ctx, nil, true); err != nil {
		n.log.Error("Cancelling the incoming migration failed", attrDomain, d.domain, attrError, err)
	}
}

// endTimeout bounds the wait for a hypervisor to close its side of a complete stream.
const endTimeout = 10 * time.Second

// awaitEnd waits for the pump of hv to end after the stream is complete; if the hypervisor
// keeps its connection open, it closes it and sends the end record itself.
func awaitEnd(tun *tunnel, hv net.Conn, pumped <-chan error) error {
	t := time.NewTimer(endTimeout)
	defer t.Stop()
	select {
	case err := <-pumped:
		return err
	case <-t.C:
	}
	hv.Close()
	if err := <-pumped; err == nil {
		return nil // it ended just now
	}
	return tun.send(recEnd, nil)
}

// dialHypervisor connects to the destination hypervisor's listener, which appears shortly
// after Prepare.
func dialHypervisor(ctx context.Context, h destinationHypervisor, ep libvirt.Endpoint) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		c, err := h.Dial(ctx, ep)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-t.C:
		}
	}
}

// --- source ---

// sender returns the task that transfers a libvirt guest with keys.
func (b libvirtBackend) sender(m *migration, req *agentapi.TransferRequest, keys dataplane.Keys, report agentapi.ProgressFunc) (func(context.Context), error) {
	n := b.n
	if n.lv == nil {
		return nil, fmt.Errorf("%w: the node does not drive libvirt", agentapi.ErrBadRequest)
	}
	tun := newTunnel(true)
	settings := transferSettings(n.cfg.Libvirt.Settings, req.MaxDowntime, m.grant)
	settings.Parallel = sourceParallel(settings.Parallel, req.Lanes)
	parallel := settings.Parallel
	src, err := dataplane.NewSource(dataplane.SourceConfig{
		MigrationID: m.id, Peer: m.grant.DataEndpoint, Dial: n.dial, Streams: 1 + parallel, Stream: tun, Lanes: tun.lane, Logger: n.log,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", agentapi.ErrBadRequest, err)
	}
	m.lv = &lvMigration{tun: tun, settings: settings}
	return func(ctx context.Context) { b.runSource(ctx, m, src, keys, report) }, nil
}

// sourceParallel is how many multifd channels a source set to carry own carries to a
// destination that accepts lanes of them (TransferRequest.Lanes): the fewer. A destination
// that predates lanes, or a broker that does not pass them on, answers 0: one stream.
func sourceParallel(own, lanes int) int { return max(0, min(own, lanes)) }

// runSource runs the source of a libvirt migration: the data plane and the libvirt steps
// side by side, then Confirm, and records the outcome.
func (b libvirtBackend) runSource(ctx context.Context, m *migration, src *dataplane.Source, keys dataplane.Keys, report agentapi.ProgressFunc) {
	n := b.n
	dctx, dcancel := context.WithCancel(ctx)
	defer dcancel()
	d := &sourceDriver{n: n, m: m, report: report}
	var wg sync.WaitGroup
	wg.Go(func() { d.run(dctx) })
	res, err := src.Run(ctx, keys)
	if err != nil {
		dcancel()
	}
	wg.Wait()
	m.lv.tun.closeLanes()
	g := m.g
	out := sendOutcome{
		progress: agentapi.Progress{
			MigrationID: m.id, Bytes: d.stats.DataProcessed, TotalBytes: uint64(m.size),
			Round: int(d.stats.Iteration), Time: n.cfg.Now(), Rounds: d.rounds, PostCopy: d.postCopy.Load(),
		},
		err: err,
	}
	if len(res.Commit.MAC) != 0 && d.stats.Downtime > 0 {
		// The completed job's statistics: how long the hypervisor kept the guest paused.
		out.progress.Downtime, out.progress.DowntimeSource = d.stats.Downtime, agentapi.DowntimeHypervisor
	}
	if len(res.Commit.MAC) == 0 {
		if d.err != nil && !errors.Is(d.err, context.Canceled) {
			out.err = errors.Join(out.err, d.err)
		}
		inDoubt := errors.Is(out.err, dataplane.ErrCommitUnknown) && !errors.Is(out.err, dataplane.ErrPeerAborted)
		if !inDoubt && d.src != nil {
			if cerr := d.src.Confirm(ctx, nil, true); cerr != nil {
				n.log.Error("Cancelling the migration at the source failed", attrMigration, m.id, attrError, cerr)
			}
		}
		if inDoubt {
			m.mu.Lock()
			m.lv.src = d.src // an abort cancels it
			m.mu.Unlock()
		}
		n.sent(m, out, report, nil)
		return
	}
	// The destination acknowledged after Finish found the guest running there.
	if cerr := d.src.Confirm(ctx, d.cookie, false); cerr != nil {
		n.log.Error("Confirming the migration failed; destroying the source domain", attrMigration, m.id, attrError, cerr)
		if rerr := n.lv.Remove(context.WithoutCancel(ctx), g.domain); rerr != nil {
			n.log.Error("Destroying the source domain failed", attrMigration, m.id, attrError, rerr)
		}
	}
	out.commit, out.erasure = &res.Commit, res.Erasure
	n.sent(m, out, report, nil)
}

// sourceDriver runs the source's libvirt steps and carries the source hypervisor's stream.
type sourceDriver struct {
	n      *Node
	m      *migration
	report agentapi.ProgressFunc

	src      sourceMigration // after Begin: the migration must end with Confirm
	cookie   []byte          // Finish's, for Confirm
	postCopy atomic.Bool     // the migration switched to post-copy
	stats    libvirt.Progress
	rounds   []agentapi.RoundStats // one per iteration seen, the last one still growing
	// roundBase and processed are the bytes sent before the current iteration and as of the
	// last statistics.
	roundBase, processed uint64
	err                  error
}

func (d *sourceDriver) run(ctx context.Context) {
	tun := d.m.lv.tun
	stop := context.AfterFunc(ctx, func() { tun.end(context.Cause(ctx)) })
	defer stop()
	d.err = d.steps(ctx, tun)
	if d.err != nil {
		tun.end(d.err)
	}
}

func (d *sourceDriver) steps(ctx context.Context, tun *tunnel) error {
	n, m := d.n, d.m
	src, offer, err := n.lv.Begin(ctx, m.g.domain, m.lv.settings)
	if err != nil {
		return err
	}
	d.src = src
	b, err := json.Marshal(offer)
	if err != nil {
		return fmt.Errorf("encoding the offer: %w", err)
	}
	if err := tun.send(recOffer, b); err != nil {
		return err
	}
	accepted, err := tun.expect(recAccepted)
	if err != nil {
		return fmt.Errorf("waiting for the destination to prepare: %w", err)
	}
	ln, err := n.lv.Listen(ctx, libvirt.UnixEndpoint(n.socketPath(m.id, "src")))
	if err != nil {
		return err
	}
	defer os.Remove(ln.Endpoint().Address)
	defer ln.Close()

	// Perform runs until the hypervisor has sent everything; ctx's end aborts it.
	pctx, pcancel := context.WithCancel(ctx)
	defer pcancel()
	var (
		perr      error
		pcookie   []byte
		performed = make(chan struct{})
	)
	go func() {
		defer close(performed)
		stopWatch := d.watchProgress(pctx)
		pcookie, perr = src.Perform(pctx, libvirt.Accepted{Cookie: accepted}, ln.Endpoint())
		stopWatch()
	}()
	fail := func(err error) error {
		pcancel()
		<-performed
		return err
	}
	actx, acancel := context.WithCancel(ctx)
	go func() {
		<-performed // Perform failed before the hypervisor connected, or ended
		acancel()
	}()
	hv, err := ln.Accept(actx)
	if err != nil {
		<-performed
		return errors.Join(perr, err)
	}
	defer hv.Close()
	stopConn := context.AfterFunc(ctx, func() { hv.Close() })
	defer stopConn()
	// The multifd channels connect after the main one.
	go acceptLanes(actx, ln, tun, m.lv.settings.Parallel)

	pumped := make(chan error, 1)
	go func() { pumped <- tun.pumpHypervisor(hv) }()
	finished := make(chan error, 1)
	go func() {
		for {
			typ, p, err := tun.recv()
			if err != nil {
				finished <- fmt.Errorf("receiving from the destination: %w", noEOF(err))
				return
			}
			if ok, err := toHypervisor(hv, typ, p); err != nil {
				finished <- err
				return
			} else if ok {
				continue
			}
			if typ != recFinished {
				finished <- fmt.Errorf("receiving from the destination: unexpected record %q", typ)
				return
			}
			d.cookie = p
			finished <- nil
			return
		}
	}()
	select {
	case err := <-pumped:
		if err != nil {
			return fail(err)
		}
		<-performed
		if perr != nil {
			return perr
		}
	case err := <-finished:
		return fail(cmp.Or(err, errors.New("the destination finished before the stream ended")))
	case <-performed:
		if perr != nil {
			return perr
		}
		// The stream is complete: the hypervisor closes its side a moment later.
		if err := awaitEnd(tun, hv, pumped); err != nil {
			return err
		}
	}
	tun.finishLanes() // the hypervisor sent everything: its channels end now
	if st, err := n.lv.JobStats(ctx, m.g.domain, true); err == nil && st.DataProcessed > 0 {
		d.stats = st
	}
	d.publish(agentapi.TransferCutover)
	if err := tun.send(recPerformed, pcookie); err != nil {
		return err
	}
	if err := <-finished; err != nil {
		return err
	}
	tun.end(nil)
	return nil
}

// acceptLanes attaches the next parallel connections the hypervisor makes to the lanes,
// one each (which channel a connection carries is in its first packet). If one does not
// come the lanes left are closed, which fails the transfer.
func acceptLanes(ctx context.Context, ln streamListener, tun *tunnel, parallel int) {
	for i := 1; i <= parallel; i++ {
		c, err := ln.Accept(ctx)
		if err != nil {
			for ; i <= parallel; i++ {
				tun.hvLane(i).Close()
			}
			return
		}
		tun.hvLane(i).attach(c)
	}
}

// watchProgress publishes the job's statistics while Perform runs, and switches to
// post-copy where allowed; the returned stop waits for it to end.
func (d *sourceDriver) watchProgress(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	lc, settings := d.n.cfg.Libvirt, d.m.lv.settings
	go func() {
		defer close(done)
		t := time.NewTicker(lc.ProgressInterval)
		defer t.Stop()
		postcopy := false
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			p, err := d.src.Progress(ctx)
			if err != nil || p.Job != libvirt.JobUnbounded {
				continue
			}
			d.stats = p
			d.publish(agentapi.TransferPrecopy)
			if settings.PostCopy && !postcopy && p.Iteration > lc.PostCopyAfter {
				if err := d.src.StartPostCopy(ctx); err != nil {
					d.n.log.Warn("Switching to post-copy failed", attrMigration, d.m.id, attrError, err)
				} else {
					d.postCopy.Store(true)
					d.n.log.Info("Switched to post-copy", attrMigration, d.m.id, attrRound, p.Iteration)
				}
				postcopy = true
			}
		}
	}()
	return func() { cancel(); <-done }
}

// publish records and reports the job's statistics as progress in phase.
func (d *sourceDriver) publish(phase agentapi.TransferPhase) {
	s := d.stats
	p := agentapi.Progress{
		MigrationID: d.m.id, Phase: phase, Bytes: s.DataProcessed, TotalBytes: uint64(d.m.size),
		Pages: s.DataProcessed / dataplane.PageSize, Round: int(s.Iteration),
		DirtyRate: float64(s.DirtyBytesPerSecond()), Time: d.n.cfg.Now(), PostCopy: d.postCopy.Load(),
	}
	p.Throughput, p.Throttle = float64(s.MemoryBandwidth), int(s.AutoConvergeThrottle)
	if s.MemoryBandwidth > 0 {
		p.ETA = time.Duration(float64(s.DataRemaining) / float64(s.MemoryBandwidth) * float64(time.Second))
	}
	// Past the first pass, a guest that dirties memory as fast as it is sent never converges.
	if phase == agentapi.TransferPrecopy && s.Iteration > 1 && s.DirtyBytesPerSecond() >= s.MemoryBandwidth && s.MemoryBandwidth > 0 {
		p.NotConverging, p.ETA = true, 0
	}
	d.round(phase == agentapi.TransferCutover)
	d.m.setProgress(p)
	d.n.log.Debug("Migration progress", attrMigration, d.m.id, attrPhase, string(phase), attrRound, p.Round, attrBytes, p.Bytes,
		"remaining", s.DataRemaining, "bandwidth", s.MemoryBandwidth, "dirty_rate", p.DirtyRate, "throttle", s.AutoConvergeThrottle)
	d.n.publish(d.report, p)
}

// round notes the job's statistics in the summary of the current iteration: libvirt
// reports counters, not rounds, so a round is what the counters moved while one iteration
// number held.
func (d *sourceDriver) round(final bool) {
	s := d.stats
	if n := len(d.rounds); n == 0 || uint64(d.rounds[n-1].Round) != s.Iteration {
		if n == agentapi.MaxRounds {
			d.rounds = d.rounds[1:]
		}
		d.rounds = append(d.rounds, agentapi.RoundStats{Round: int(s.Iteration)})
		d.roundBase = d.processed
	}
	d.processed = max(d.processed, s.DataProcessed)
	r := &d.rounds[len(d.rounds)-1]
	r.Final = final
	r.Bytes = d.processed - d.roundBase
	r.Pages = r.Bytes / dataplane.PageSize
	r.DirtyRate, r.Throughput, r.Throttle = float64(s.DirtyBytesPerSecond()), float64(s.MemoryBandwidth), int(s.AutoConvergeThrottle)
	if r.Throughput > 0 {
		r.Duration = time.Duration(float64(r.Bytes) / r.Throughput * float64(time.Second))
	}
}

// transferSettings are the source's libvirt settings for one transfer: the agent's, held to
// the transfer's downtime limit (downtimeLimit of the broker's limit req and grant g), with
// post-copy only if the operator allows it (the agent's setting) and the tenant's policy
// too, as the grant says: a failure after the switch loses the guest.
func transferSettings(agent libvirt.Settings, req time.Duration, g *grant.Grant) libvirt.Settings {
	s := sourceSettings(agent, downtimeLimit(req, g))
	s.PostCopy = s.PostCopy && g != nil && g.PostCopy
	return s
}

// sourceSettings are the source's libvirt settings for a transfer with downtime limit
// limit: the agent's own, with its limit lowered to limit (never raised) and auto-converge
// allowed, so that a guest that dirties memory too fast is throttled until it fits.
func sourceSettings(s libvirt.Settings, limit time.Duration) libvirt.Settings {
	if limit <= 0 {
		return s
	}
	if s.MaxDowntime <= 0 || limit < s.MaxDowntime {
		s.MaxDowntime = limit
	}
	s.AutoConverge = true
	return s
}

// resume cancels the begun migration of a source guest left paused by a transfer in doubt,
// which resumes the guest. Callers hold m.mu.
func (libvirtBackend) resume(ctx context.Context, m *migration) error {
	if m.lv == nil || m.lv.src == nil {
		return nil
	}
	src := m.lv.src
	m.lv.src = nil
	return src.Confirm(ctx, nil, true)
}

// discard destroys the guest's domain.
func (b libvirtBackend) discard(ctx context.Context, g *guest, _ *attest.ErasureStatement) {
	if b.n.lv == nil {
		return
	}
	if err := b.n.lv.Remove(ctx, g.domain); err != nil {
		b.n.log.Error("Destroying the source domain failed", attrDomain, g.domain, attrError, err)
	}
}

var _ io.ReadWriteCloser = (*tunnel)(nil)
