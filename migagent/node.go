package migagent

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"
)

// Config configures a Node.
type Config struct {
	// Host is this host's name, a valid name (agentapi.ValidName). Required.
	Host string
	// Conn is the agent's NATS connection. Required. With authentication, its user needs the
	// agent's permissions and the inbox prefix natsauth.InboxPrefix(natsauth.RoleAgent, Host).
	Conn *nats.Conn
	// Attester produces this host's evidence. Required.
	Attester attest.Attester
	// KeybrokerKey is the keybroker's public key (its receipt-signing key, PEM from
	// lethe-keybroker --export-pub), pinned: the node accepts sealed keys only with a grant
	// signed by it (package grant). Required.
	KeybrokerKey ed25519.PublicKey
	// Platform is the platform the host record states. Zero means Attester.Platform().
	Platform attest.Platform
	// Labels and Region describe the host in its record (policies may constrain them). Nil
	// and empty mean none.
	Labels map[string]string
	Region string
	// DataListen is the host:port the data plane listens on for an incoming migration, one
	// listener per migration; port 0 picks an ephemeral port per migration (a fixed port
	// admits one incoming migration at a time). Empty means "127.0.0.1:0".
	DataListen string
	// DataAdvertise is the host (or IP) the source is told to dial, combined with the
	// listener's port. Empty means DataListen's host.
	DataAdvertise string
	// Streams is the number of data-plane connections of a transfer whose request names none.
	// Zero means 4.
	Streams int
	// Guests are the guests the host holds from the start.
	Guests []GuestSpec
	// WorkloadRate is how many pages per second each guest's synthetic workload writes. Zero
	// means 2000; negative means the workloads never write.
	WorkloadRate int
	// HeartbeatInterval is the time between host record heartbeats (a change of the guests is
	// published at once). Zero means 5 s; it must stay well below the broker's host TTL.
	HeartbeatInterval time.Duration
	// MaxRounds and ConvergedPages tune pre-copy (dataplane.SourceConfig). Zero means the
	// data plane's defaults.
	MaxRounds, ConvergedPages int
	// NoAutoConverge keeps pre-copy from throttling an in-process guest's workload when the
	// guest dirties memory too fast to converge (dataplane.SourceConfig.AutoConverge). False
	// (the zero value) throttles it in every transfer with a downtime limit.
	NoAutoConverge bool
	// Logger receives the agent's logs. Nil means slog.Default().
	Logger *slog.Logger
	// Now returns the current time. Nil means time.Now.
	Now func() time.Time
	// Metrics receives the agent's measurements. Nil means none are taken.
	Metrics Metrics
	// Libvirt, with its Socket set, makes the host's libvirt domains the node's guests and
	// every incoming migration a libvirt migration (see libvirt.go); Guests must then be
	// empty. The zero value means no libvirt.
	Libvirt LibvirtConfig
	// DataDial opens the source's data-plane connections. Nil means TCP.
	DataDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// AllocatableBytes is how much memory the host offers guests, stated in its record for
	// the broker's placement. Zero means all of the host's memory (MemTotal).
	AllocatableBytes uint64
	// MaxMigrations is how many migrations, as source or destination, the agent holds in
	// flight at once, stated in its record so that brokers admit no more; the agent refuses
	// one beyond it (ErrConflict). Each holds HPKE keys, evidence and, as a destination, a
	// listener and a receive region. Zero means 256.
	MaxMigrations int
}

// Node is a migration agent. Create it with New and run it with Run.
type Node struct {
	cfg     Config
	log     *slog.Logger
	advHost string
	changed chan struct{}
	started chan struct{} // closed once the agent API is served
	tasks   sync.WaitGroup
	// prepMu serializes Prepare, which works outside mu.
	prepMu sync.Mutex
	// dial opens the source's data-plane connections; nil means TCP. Tests replace it.
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// backend holds and moves the guests: in-process memory, or libvirt domains with
	// Config.Libvirt.
	backend backend
	// lv is the connection to the host's libvirtd, set by Run before the agent API is
	// served; nil without libvirt.
	lv hypervisor

	// life is Run's context: the tasks that requests start (transfers, receptions, the
	// workloads of received guests) run under it, not under the request's context, which
	// ends with the request. Set by Run before the agent API is served.
	life context.Context

	// mu guards the maps, stopping and the guests' mutable fields. It is held only for
	// lookups and updates, never across I/O, and taken after a migration's own lock (see
	// state.go), never before it.
	mu       sync.Mutex
	guests   map[string]*guest
	migs     map[string]*migration
	stopping bool
	// maxLive is the limit of migrations in flight (Config.MaxMigrations); preparing counts
	// the preparation under way whose migration is not in migs yet (see admit).
	maxLive, preparing int
	// memTotal is the host's memory (MemTotal; zero where it cannot be read). tcb is the TCB
	// level the host's own evidence reported when Run started; nil if it could not be read.
	memTotal uint64
	tcb      *attest.HostTCB
}

// New checks cfg, fills in defaults and makes the configured guests' memory. It returns an
// error for a missing required field, an invalid host or data address, or a guest that
// cannot be made.
func New(cfg Config) (*Node, error) {
	if cfg.Conn == nil || cfg.Attester == nil {
		return nil, errors.New("creating agent: Conn and Attester are required")
	}
	if len(cfg.KeybrokerKey) != ed25519.PublicKeySize {
		return nil, errors.New("creating agent: the keybroker's public key is required: the agent accepts keys only with grants signed by it")
	}
	if err := agentapi.ValidName(cfg.Host); err != nil {
		return nil, fmt.Errorf("creating agent: host: %w", err)
	}
	if cfg.Platform == attest.PlatformUnknown {
		cfg.Platform = cfg.Attester.Platform()
	}
	if cfg.DataListen == "" {
		cfg.DataListen = "127.0.0.1:0"
	}
	host, _, err := net.SplitHostPort(cfg.DataListen)
	if err != nil {
		return nil, fmt.Errorf("creating agent: data listen address: %w", err)
	}
	adv := cmp.Or(cfg.DataAdvertise, host)
	if adv == "" || adv == "0.0.0.0" || adv == "::" {
		return nil, fmt.Errorf("creating agent: data listen address %q needs a data advertise host", cfg.DataListen)
	}
	if cfg.Streams <= 0 {
		cfg.Streams = 4
	}
	if cfg.WorkloadRate == 0 {
		cfg.WorkloadRate = 2000
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Metrics == nil {
		cfg.Metrics = noMetrics{}
	}
	if err := checkLibvirt(&cfg); err != nil {
		return nil, fmt.Errorf("creating agent: %w", err)
	}
	n := &Node{
		cfg:     cfg,
		log:     cfg.Logger.With(attrComponent, "agent", attrHost, cfg.Host),
		advHost: adv,
		changed: make(chan struct{}, 1),
		started: make(chan struct{}),
		guests:  map[string]*guest{},
		migs:    map[string]*migration{},
		dial:    cfg.DataDial,
		life:    context.Background(),
		maxLive: cmp.Or(cfg.MaxMigrations, defaultMaxLive),
	}
	if cfg.MaxMigrations < 0 {
		return nil, fmt.Errorf("creating agent: a limit of %d migrations in flight", cfg.MaxMigrations)
	}
	n.memTotal = hostMemory()
	n.backend = memoryBackend{n}
	if cfg.Libvirt.Socket != "" {
		n.backend = libvirtBackend{n}
	}
	for _, spec := range cfg.Guests {
		if _, dup := n.guests[guestKey(spec.Tenant, spec.VM)]; dup {
			n.closeGuests()
			return nil, fmt.Errorf("creating agent: guest %s/%s configured twice", spec.Tenant, spec.VM)
		}
		g, err := openGuest(spec, cfg.WorkloadRate)
		if err != nil {
			n.closeGuests()
			return nil, fmt.Errorf("creating agent: %w", err)
		}
		n.guests[g.key()] = g
	}
	return n, nil
}

// Run serves the agent API, heartbeats the host record and runs the guests' workloads and
// the migrations' transfers until ctx ends. Then it aborts the migrations in flight (keys
// zeroized, receive regions scrubbed, a paused source guest resumed), zeroizes the guests'
// memory data keys and releases their memory. It returns an error if the agent API cannot be
// served, and nil when ctx ends. A Node runs once.
func (n *Node) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	n.life = ctx
	if err := n.startLibvirt(ctx); err != nil {
		n.shutdown()
		return err
	}
	stop, err := agentapi.Start(ctx, n.cfg.Conn, n.cfg.Host, n)
	if err != nil {
		n.shutdown()
		n.closeLibvirt()
		return err
	}
	n.mu.Lock()
	for _, gu := range n.guests {
		n.startWorkload(ctx, gu)
	}
	n.mu.Unlock()
	n.readTCB(ctx)
	n.log.Info("Agent started", attrPlatform, n.cfg.Platform.String(), attrGuests, len(n.cfg.Guests))
	close(n.started)
	g.Go(func() error {
		<-ctx.Done()
		stop()
		return nil
	})
	g.Go(func() error { return n.heartbeat(ctx) })
	g.Go(func() error { return n.watchLibvirt(ctx) })
	g.Go(func() error {
		<-ctx.Done()
		n.mu.Lock()
		n.stopping = true // no task starts after this
		n.mu.Unlock()
		n.tasks.Wait() // transfers, receptions and workloads end with ctx
		return nil
	})
	err = g.Wait()
	n.shutdown()
	n.closeLibvirt()
	n.log.Info("Agent stopped")
	return err
}

// Started is closed once Run serves the agent API.
func (n *Node) Started() <-chan struct{} { return n.started }

// errStopping is returned by requests that arrive while the node shuts down.
var errStopping = errors.New("agent shutting down")

// spawn runs f as a task of the node, which Run waits for, and reports false (running
// nothing) once the node is shutting down. Callers hold n.mu.
func (n *Node) spawn(f func()) bool {
	if n.stopping {
		return false
	}
	n.tasks.Go(f)
	return true
}

// startWorkload starts g's workload under ctx. Callers hold n.mu.
func (n *Node) startWorkload(ctx context.Context, g *guest) {
	if n.cfg.WorkloadRate < 0 || g.stop != nil || g.workload == nil {
		return
	}
	wctx, cancel := context.WithCancel(ctx)
	w, done := g.workload, make(chan struct{})
	if n.spawn(func() { defer close(done); _ = w.Run(wctx) }) {
		g.stop = func() { cancel(); <-done }
	} else {
		cancel()
	}
}

// hostChanged asks for a heartbeat now.
func (n *Node) hostChanged() {
	select {
	case n.changed <- struct{}{}:
	default:
	}
}

// record returns the host record with the guests held now.
func (n *Node) record() agentapi.HostRecord {
	n.mu.Lock()
	defer n.mu.Unlock()
	rec := agentapi.HostRecord{
		Host: n.cfg.Host, Platform: n.cfg.Platform, Labels: n.cfg.Labels, Region: n.cfg.Region,
		DataAddr: n.advHost, MemoryBytes: n.memTotal, AllocatableBytes: cmp.Or(n.cfg.AllocatableBytes, n.memTotal), TCB: n.tcb,
		MaxMigrations: n.maxLive,
	}
	for _, g := range n.guests {
		rec.Guests = append(rec.Guests, agentapi.HostGuest{Tenant: g.tenant, VM: g.vm, MemoryBytes: uint64(g.memoryBytes())})
	}
	slices.SortFunc(rec.Guests, func(a, b agentapi.HostGuest) int {
		return cmp.Or(cmp.Compare(a.Tenant, b.Tenant), cmp.Compare(a.VM, b.VM))
	})
	return rec
}

// heartbeat writes the host record at once, then every interval and whenever the guests
// change, from one goroutine so that an older record never overwrites a newer one. Each
// heartbeat is bounded by the interval, and a failed one is sent again after a fifth of it
// (agentapi.Heartbeater), so that a NATS server going away costs a host a few seconds of
// heartbeats, never its TTL.
func (n *Node) heartbeat(ctx context.Context) error {
	hb, err := agentapi.NewHeartbeater(agentapi.HeartbeaterConfig{
		Conn: n.cfg.Conn, Record: n.record, Interval: n.cfg.HeartbeatInterval, Now: n.cfg.Now, Logger: n.log,
	})
	if err != nil {
		return err
	}
	t := time.NewTimer(n.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		err := hb.Beat(ctx)
		if err != nil && ctx.Err() == nil {
			n.log.Warn("Heartbeat failed", attrError, err)
		}
		// A failed heartbeat goes again soon: the host's record must not age to its TTL.
		t.Reset(hb.Next(err))
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-n.changed:
		}
	}
}

// shutdownTimeout bounds how long shutdown waits for the hypervisor while it aborts the
// migrations left in flight.
const shutdownTimeout = 30 * time.Second

// shutdown aborts what is left in flight and releases every key and region. The tasks have
// ended.
func (n *Node) shutdown() {
	n.mu.Lock()
	n.stopping = true
	migs := make([]*migration, 0, len(n.migs))
	for _, m := range n.migs {
		migs = append(migs, m)
	}
	n.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	for _, m := range migs {
		if m.phase() == phaseInDoubt {
			// The FIN went out without an acknowledgement: the destination may have resumed
			// the guest, so resuming it here could run two copies. It stays paused for the
			// broker to reconcile (see the package doc).
			n.log.Warn("Leaving the guest paused at shutdown: the commit's outcome is unknown", attrMigration, m.id)
			continue
		}
		if _, err := n.abort(ctx, m, "agent shutting down", nil); err != nil && !errors.Is(err, agentapi.ErrConflict) {
			n.log.Warn("Aborting migration at shutdown failed", attrMigration, m.id, attrError, err)
		}
	}
	n.closeGuests()
}

// closeGuests zeroizes every guest's memory data key and releases its memory.
func (n *Node) closeGuests() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for k, g := range n.guests {
		if g.stop != nil {
			g.stop()
			g.stop = nil
		}
		g.mdk.Destroy()
		g.mdk = nil
		if g.region == nil {
			delete(n.guests, k)
			continue
		}
		if err := g.region.Close(); err != nil {
			n.log.Warn("Releasing guest memory failed", attrTenant, g.tenant, attrVM, g.vm, attrError, err)
		}
		delete(n.guests, k)
	}
}

// listen opens a data-plane listener for one incoming migration and returns it with the
// endpoint the source must dial.
func (n *Node) listen() (net.Listener, string, error) {
	ln, err := net.Listen("tcp", n.cfg.DataListen)
	if err != nil {
		return nil, "", fmt.Errorf("opening data-plane listener on %s: %w", n.cfg.DataListen, err)
	}
	_, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		ln.Close()
		return nil, "", fmt.Errorf("reading data-plane listener address: %w", err)
	}
	return ln, net.JoinHostPort(n.advHost, port), nil
}
