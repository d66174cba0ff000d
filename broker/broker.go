package broker

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lethe-cc/lethe/internal/trace"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"
)

// Timeouts bound the phases of a migration; a migration that exceeds one is aborted.
type Timeouts struct {
	// Start bounds the time from the admission to the start of the transfer (Attesting,
	// KeysReleased), counted again from each fallback to another destination after a
	// denial. Zero means 120 s.
	Start time.Duration
	// Queue bounds the time a migration waits in Requested for its hosts to admit it (see
	// admission.go), from the request. Zero means 30 min.
	Queue time.Duration
	// Progress bounds the time without a progress report from the source during the transfer
	// and cutover. Zero means 150 s (KubeVirt's progress timeout).
	Progress time.Duration
	// PerGiB bounds the whole transfer and cutover, per GiB of guest memory (never less than
	// Progress). Zero means 150 s (KubeVirt's completion timeout per GiB).
	PerGiB time.Duration
}

// Config configures a Broker.
type Config struct {
	// Conn is the broker's NATS connection, on which it serves its API and calls agents and
	// the keybroker. Required. Its user needs the broker's permissions
	// (natsauth.UserPermissions) and, with authentication, the inbox prefix
	// natsauth.InboxPrefix(natsauth.RoleBroker, "").
	Conn *nats.Conn
	// StoreConn is the connection of every JetStream and key-value operation. Its user needs
	// the permissions of natsauth.RoleBrokerStore and the inbox prefix
	// natsauth.InboxPrefix(natsauth.RoleBrokerStore, "").
	// Nil means Conn, whose user then needs JetStream rights beside the ones it serves with,
	// and only the broker's reply checks keep callers from borrowing them.
	StoreConn *nats.Conn
	// KeyBroker is the keybroker. Required (usually a KeyBrokerClient).
	KeyBroker KeyBroker
	// Logger receives the broker's logs. Nil means slog.Default().
	Logger *slog.Logger
	// ID names this broker instance in leases and logs. Empty means a random id.
	ID string
	// Now returns the current time. Nil means time.Now. Tests inject a clock here.
	Now func() time.Time
	// Timeouts bound the phases; zero fields take their defaults.
	Timeouts Timeouts
	// Lease is how long a broker's claim on a migration lasts without renewal. Zero means
	// 15 s. Another broker takes over a migration whose lease expired: a killed broker's
	// migrations wait this long, at most, plus CheckInterval. The broker renews its leases
	// well inside it (see the package doc), so a short lease costs a write every few seconds
	// per migration in flight, never a migration.
	Lease time.Duration
	// MaxMigrationsPerHost is how many migrations a host takes part in at once, as source
	// or destination, lowered to what the host's agent states it takes; a migration beyond it
	// waits in Requested (see admission.go). Zero means 64.
	MaxMigrationsPerHost int
	// TenantShare is the share of a host's places one tenant's migrations may hold, in
	// (0, 1]: without it, a tenant naming one host as the destination of as many guests as the
	// host has places keeps every other tenant's migrations there waiting until their queue
	// timeout. Zero means 0.5; 1 lets one tenant hold them all.
	TenantShare float64
	// MaxKeyBrokerCalls is how many key releases, and how many destructions, this broker
	// asks of the keybrokers at once; the others wait their turn in the broker (kbbound.go).
	// Zero means 32.
	MaxKeyBrokerCalls int
	// CheckInterval is how often the broker looks for migrations to take over and checks
	// timeouts and agents. Zero means 1 s.
	CheckInterval time.Duration
	// RelistInterval is how often the broker lists the migrations bucket to refill its view
	// of the live migrations, which the watch keeps up to date between listings (live.go).
	// Zero means 30 s.
	RelistInterval time.Duration
	// HostTTL is how old a host's heartbeat may be before the host counts as lost; it is also
	// the TTL of the lethe-hosts bucket. Zero means 30 s.
	HostTTL time.Duration
	// AgentTimeout bounds one call to an agent or the keybroker. Zero means 30 s.
	AgentTimeout time.Duration
	// Streams is the number of data-plane connections a transfer uses. Zero means 4.
	Streams int
	// MaxDowntime is the operator's limit on how long a guest may be paused at cutover; a
	// tenant's policy may lower it for its migrations (spec.transport.maxDowntime), never
	// raise it. Zero means the broker sets none (the agents' own limits hold).
	MaxDowntime time.Duration
	// MaxAttempts bounds the destinations one migration asks the keybroker to release to: after
	// a denial it tries its next candidate until it has tried this many. Zero means 3; 1 means
	// a denial always aborts.
	MaxAttempts int
	// ReadPolicy extracts the pre-filter from a signed policy envelope. Nil means no policy
	// pre-filter: destinations are checked for liveness and platform only, and dry runs say so.
	ReadPolicy PolicyReader
	// Replicas is the JetStream replication of the buckets and stream. Zero means 1.
	Replicas int
	// EventsRetention is how long LETHE_EVENTS keeps events. Zero means 30 days.
	EventsRetention time.Duration
	// AuditRetention is how long LETHE_AUDIT keeps audit records. Zero means 365 days.
	AuditRetention time.Duration
	// EndedGrace is how long an ended migration stays in the live bucket, which every check
	// reads whole, before it moves to the archive bucket (archive.go). Zero means 1 hour.
	EndedGrace time.Duration
	// ArchiveRetention is how long the archive keeps an ended migration, counted from when it
	// moved there. Zero means 365 days; negative keeps it for ever.
	ArchiveRetention time.Duration
	// ReceiptRetention is how long the receipts bucket keeps a receipt. Zero keeps receipts
	// for ever: a tenant may need one long after its migration (lethectl receipt export).
	ReceiptRetention time.Duration
	// MaxConcurrentRequests bounds API requests handled at once. Zero means 64.
	MaxConcurrentRequests int
	// Metrics receives the broker's measurements. Nil means none are taken.
	Metrics Metrics
	// Tracer records a span per phase of each migration this broker moves out of it, and the
	// source agent's rounds and pause from its committed report, in the migration's trace
	// (internal/trace). Nil means no tracing.
	Tracer *trace.Tracer
	// Fleet tunes placement and fleet operations; zero fields take their defaults.
	Fleet FleetConfig
}

// FleetConfig tunes placement and fleet operations (drain, evacuate, rebalance).
type FleetConfig struct {
	// PlacementOrder ranks the hosts that qualify for a guest (see placement.go): keys of
	// PlacementKeys. Nil means tcb, memory.
	PlacementOrder []string
	// MaxParallel is the most migrations a fleet operation lets run across the cluster at
	// once, counting those started by hand. Zero means 5.
	MaxParallel int
	// PerSource and PerDestination are the most migrations out of and into one host at once.
	// Zero means 2 each.
	PerSource, PerDestination int
	// RebalanceThreshold is the fraction of a host's allocatable memory a rebalance brings
	// its committed memory under. Zero means 0.8.
	RebalanceThreshold float64
}

// Broker runs the migration control plane. Create it with New and run it with Run.
type Broker struct {
	cfg    Config
	log    *slog.Logger
	nc     *nats.Conn
	kb     KeyBroker
	agents *agentapi.Client
	now    func() time.Time

	ready chan struct{}
	store *store // set by Run before ready is closed

	mu       sync.Mutex
	driving  map[string]chan struct{} // migrations driven by this broker → wake-up
	attached map[string]bool          // migrations whose transfer this broker re-attached to
	drivers  sync.WaitGroup
	// opsDriving are the fleet operations this broker drives → wake-up; run is Run's
	// context, under which drivers outlive requests. Both guarded by mu.
	opsDriving map[string]chan struct{}
	run        context.Context
	// fleetLeadUntil is when this broker's lease on driving fleet operations ends (zero:
	// it does not lead); guarded by mu. fleetMu serializes the fleet operations' starts.
	fleetLeadUntil time.Time
	fleetMu        sync.Mutex

	// activeMu guards active: the unfinished migrations as reconcile last listed them, with
	// those this broker created since (see noteActive).
	activeMu sync.Mutex
	active   map[string]activeMigration

	// waitingMu guards waiting, the migrations this broker drives that wait for admission;
	// reclaimed, when it last reclaimed each host's places; and places, the view of every
	// host's places, whole while placesSeen (see admission.go).
	// watched is the revision of the migrations bucket the watch delivered last; live is
	// the view of the live migrations it feeds (live.go).
	watched atomic.Uint64
	live    *liveView

	// hostRecsMu guards hostRecs, the view of the host records (hostview.go); nil while
	// the hosts are not watched.
	hostRecsMu sync.Mutex
	hostRecs   map[string]*agentapi.HostRecord

	waitingMu  sync.Mutex
	waiting    map[string]waiter
	reclaimed  map[string]time.Time
	places     map[string]*hostSlots
	placesSeen bool
}

// activeMigration is what placement needs of a migration in flight.
type activeMigration struct {
	Source, Destination string
	MemoryBytes         uint64
	// noted is when noteActive added it; zero for one reconcile listed.
	noted time.Time
	// missed says the last listing did not see it: a listing of the bucket has been seen to
	// miss a record that is there, so it takes two in a row to drop one.
	missed bool
}

// New returns a Broker, or an error if cfg lacks a required field.
func New(cfg Config) (*Broker, error) {
	if cfg.Conn == nil {
		return nil, errors.New("creating broker: Conn is required")
	}
	if cfg.KeyBroker == nil {
		return nil, errors.New("creating broker: KeyBroker is required")
	}
	if cfg.StoreConn == nil {
		cfg.StoreConn = cfg.Conn
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ID == "" {
		cfg.ID = "broker-" + rand.Text()[:10]
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	setDefault(&cfg.Timeouts.Start, 120*time.Second)
	setDefault(&cfg.Timeouts.Queue, 30*time.Minute)
	setDefault(&cfg.Timeouts.Progress, 150*time.Second)
	setDefault(&cfg.Timeouts.PerGiB, 150*time.Second)
	setDefault(&cfg.Lease, 15*time.Second)
	setDefault(&cfg.CheckInterval, time.Second)
	setDefault(&cfg.RelistInterval, 30*time.Second)
	setDefault(&cfg.HostTTL, 30*time.Second)
	setDefault(&cfg.AgentTimeout, 30*time.Second)
	setDefault(&cfg.EventsRetention, 30*24*time.Hour)
	setDefault(&cfg.AuditRetention, 365*24*time.Hour)
	setDefault(&cfg.EndedGrace, time.Hour)
	switch {
	case cfg.ArchiveRetention == 0:
		cfg.ArchiveRetention = 365 * 24 * time.Hour
	case cfg.ArchiveRetention < 0:
		cfg.ArchiveRetention = 0 // the bucket's TTL: none
	}
	cfg.ReceiptRetention = max(cfg.ReceiptRetention, 0)
	if cfg.Streams <= 0 {
		cfg.Streams = 4
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 3
	}
	if cfg.MaxMigrationsPerHost <= 0 {
		cfg.MaxMigrationsPerHost = defaultMaxMigrationsPerHost
	}
	if cfg.TenantShare <= 0 {
		cfg.TenantShare = 0.5
	}
	if cfg.MaxKeyBrokerCalls <= 0 {
		cfg.MaxKeyBrokerCalls = defaultMaxKeyBrokerCalls
	}
	cfg.TenantShare = min(cfg.TenantShare, 1)
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.MaxConcurrentRequests <= 0 {
		cfg.MaxConcurrentRequests = 64
	}
	if cfg.Metrics == nil {
		cfg.Metrics = noMetrics{}
	}
	if cfg.Fleet.PlacementOrder == nil {
		cfg.Fleet.PlacementOrder = []string{PlaceByTCB, PlaceByMemory}
	}
	if err := CheckPlacementOrder(cfg.Fleet.PlacementOrder); err != nil {
		return nil, fmt.Errorf("creating broker: %w", err)
	}
	if cfg.Fleet.MaxParallel <= 0 {
		cfg.Fleet.MaxParallel = 5
	}
	if cfg.Fleet.PerSource <= 0 {
		cfg.Fleet.PerSource = 2
	}
	if cfg.Fleet.PerDestination <= 0 {
		cfg.Fleet.PerDestination = 2
	}
	if cfg.Fleet.RebalanceThreshold <= 0 || cfg.Fleet.RebalanceThreshold > 1 {
		cfg.Fleet.RebalanceThreshold = 0.8
	}
	return &Broker{
		cfg:        cfg,
		log:        cfg.Logger.With(logKeyComponent, "broker", logKeyBroker, cfg.ID),
		nc:         cfg.Conn,
		kb:         newBoundedKeyBroker(cfg.KeyBroker, cfg.MaxKeyBrokerCalls),
		agents:     agentapi.NewClient(cfg.Conn, cfg.AgentTimeout),
		now:        cfg.Now,
		ready:      make(chan struct{}),
		driving:    make(map[string]chan struct{}),
		attached:   make(map[string]bool),
		opsDriving: make(map[string]chan struct{}),
		active:     make(map[string]activeMigration),
		live:       newLiveView(),
	}, nil
}

func setDefault(d *time.Duration, v time.Duration) {
	if *d <= 0 {
		*d = v
	}
}

// ID returns the broker's instance id.
func (b *Broker) ID() string { return b.cfg.ID }

// Ready is closed once Run has created the buckets and serves the API.
func (b *Broker) Ready() <-chan struct{} { return b.ready }

// storeReadyTimeout bounds StoreReady's question when its context has no deadline.
const storeReadyTimeout = 2 * time.Second

// StoreReady returns nil when JetStream answers for the broker's store: the migrations
// bucket's stream has a leader, which tells its state within ctx (2 s if ctx has no
// deadline). On a cluster that lost its quorum the stream has no leader, and the broker can
// neither read nor write a record. The error matches ErrUnavailable, also before Run
// opened the store.
func (b *Broker) StoreReady(ctx context.Context) error {
	select {
	case <-b.ready:
	default:
		return fmt.Errorf("%w: the store is not open yet", ErrUnavailable)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, storeReadyTimeout)
		defer cancel()
	}
	s, err := b.store.js.Stream(ctx, "KV_"+MigrationsBucket)
	if err != nil {
		return fmt.Errorf("asking JetStream for the migrations bucket: %w", &unavailableError{err: err})
	}
	// A server that is not the leader answers too, when the stream has none.
	if c := s.CachedInfo().Cluster; c != nil && c.Leader == "" {
		return fmt.Errorf("%w: the migrations bucket's stream has no leader (JetStream without quorum)", ErrUnavailable)
	}
	return nil
}

// Run creates the JetStream buckets and stream if needed, serves the broker API, records
// agents' progress and heartbeats (the broker alone writes the hosts bucket), and drives migrations until ctx ends. It returns nil when ctx ends, or
// the first error that stops one of its tasks.
func (b *Broker) Run(ctx context.Context) error {
	js, err := jetstream.New(b.cfg.StoreConn)
	if err != nil {
		return fmt.Errorf("opening jetstream: %w", err)
	}
	st, err := openStore(ctx, js, storeConfig{
		replicas:         b.cfg.Replicas,
		hostTTL:          b.cfg.HostTTL,
		eventsRetention:  b.cfg.EventsRetention,
		auditRetention:   b.cfg.AuditRetention,
		archiveRetention: b.cfg.ArchiveRetention,
		receiptRetention: b.cfg.ReceiptRetention,
		log:              b.log,
	})
	if err != nil {
		return err
	}
	b.store = st

	g, gctx := errgroup.WithContext(ctx)
	b.mu.Lock()
	b.run = gctx
	b.mu.Unlock()
	svc, err := b.serveAPI(gctx)
	if err != nil {
		return err
	}
	progressSub, err := b.nc.QueueSubscribe(agentapi.ProgressWildcard, "lethe-broker", func(m *nats.Msg) {
		b.handleProgress(gctx, m)
	})
	if err != nil {
		_ = svc.Stop()
		return fmt.Errorf("subscribing to agent progress: %w", err)
	}
	heartbeats, err := b.serveHeartbeats(gctx)
	if err != nil {
		_ = svc.Stop()
		_ = progressSub.Unsubscribe()
		return err
	}
	// The first watch is made before the broker says it runs, so that a record written after
	// that wakes its driver; one that cannot be made yet is made again by watchMigrations.
	watcher, err := watchBounded(gctx, b.store.migrations, ">", jetstream.UpdatesOnly())
	if err != nil {
		b.log.Warn("Watching the migrations failed; watching again", logKeyError, err)
	}
	if err := b.nc.Flush(); err != nil {
		return fmt.Errorf("flushing subscriptions: %w", err)
	}
	b.log.Info("Broker running")
	close(b.ready)

	g.Go(func() error { return b.watchMigrations(gctx, watcher) })
	g.Go(func() error { b.watchPlaces(gctx); return nil })
	g.Go(func() error { b.watchHosts(gctx); return nil })
	g.Go(func() error { return b.reconcileLoop(gctx) })
	g.Go(func() error {
		<-gctx.Done()
		_ = progressSub.Drain()
		_ = heartbeats.Stop()
		_ = svc.Stop()
		return nil
	})
	err = g.Wait()
	b.drivers.Wait()
	b.releaseLeases(context.WithoutCancel(ctx))
	b.log.Info("Broker stopped")
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// releaseLeases gives up the leases this broker holds when it stops, so that another broker
// takes its migrations over at once instead of when the leases expire. Every step is
// idempotent, so the next broker reruns the step this one was cut off in. Failures are logged:
// the lease then simply expires.
func (b *Broker) releaseLeases(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	recs, err := listJSON[Migration](ctx, b.store.migrations, ">")
	if err != nil {
		b.log.Warn("Listing migrations to release their leases failed", logKeyError, err)
		return
	}
	for _, r := range recs {
		if r.Phase.Terminal() || r.Owner != b.cfg.ID {
			continue
		}
		m, rev, err := getJSON[Migration](ctx, b.store.migrations, r.ID)
		if err != nil || m.Owner != b.cfg.ID {
			continue
		}
		m.Owner, m.LeaseUntil = "", time.Time{}
		if _, err := updateJSON(ctx, b.store.migrations, m.ID, m, rev); err != nil {
			if !errors.Is(err, errRevision) {
				b.log.Warn("Releasing a lease failed; it expires instead", logKeyMigration, m.ID, logKeyError, err)
			}
			continue
		}
		b.log.Info("Lease released for another broker", logKeyMigration, m.ID, logKeyPhase, m.Phase)
	}
	if cur, rev, err := getJSON[fleetLeader](ctx, b.store.fleet, fleetLeaderKey); err == nil && cur.Owner == b.cfg.ID {
		if _, err := updateJSON(ctx, b.store.fleet, fleetLeaderKey, fleetLeader{}, rev); err != nil {
			b.log.Warn("Releasing the fleet leader's lease failed; it expires instead", logKeyError, err)
		}
	}
	ops, err := listJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+">")
	if err != nil {
		b.log.Warn("Listing fleet operations to release their leases failed", logKeyError, err)
		return
	}
	for _, op := range ops {
		if op.State.Terminal() || op.Owner != b.cfg.ID {
			continue
		}
		_, err := b.updateOp(ctx, op.ID, false, func(op *FleetOp) bool {
			if op.Owner != b.cfg.ID {
				return false
			}
			op.Owner, op.LeaseUntil = "", time.Time{}
			return true
		})
		if err != nil {
			b.log.Warn("Releasing a fleet operation's lease failed; it expires instead", "operation", op.ID, logKeyError, err)
		}
	}
}

// holdLease renews this broker's lease on migration id every third of the lease until ctx
// ends (the end of a step), so that a step longer than the lease, made of calls to agents and
// the keybroker of up to AgentTimeout each, does not lose its migration to another broker
// while it runs. It stops once the migration is no longer this broker's or has ended. A
// renewal that fails is tried at the next tick: the lease outlasts two of them.
func (b *Broker) holdLease(ctx context.Context, id string) {
	t := time.NewTicker(b.cfg.Lease / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m, rev, err := getJSON[Migration](ctx, b.store.migrations, id)
		if err != nil {
			continue
		}
		if m.Owner != b.cfg.ID || m.Phase.Terminal() {
			return
		}
		m.LeaseUntil = b.now().Add(b.cfg.Lease)
		if _, err := updateJSON(ctx, b.store.migrations, id, m, rev); err != nil && !errors.Is(err, errRevision) && ctx.Err() == nil {
			b.log.Warn("Renewing a lease failed", logKeyMigration, id, logKeyError, err)
		}
	}
}

// Pauses before watching the migrations again: the first, doubled after each watch that
// could not be made or ended at once, up to the last.
const (
	watchRetryMin = 100 * time.Millisecond
	watchRetryMax = 5 * time.Second
)

// watchMigrations wakes the driver of every migration whose record changes, until ctx ends;
// it follows w first, unless nil. The reconcile loop drives every migration meanwhile, every
// CheckInterval.
func (b *Broker) watchMigrations(ctx context.Context, w jetstream.KeyWatcher) error {
	b.keepWatching(ctx, "the migrations", w, func(ctx context.Context) (jetstream.KeyWatcher, error) {
		return watchBounded(ctx, b.store.migrations, ">", jetstream.UpdatesOnly())
	}, b.followMigrations)
	return nil
}

// keepWatching follows w (made by watch if nil) with follow until ctx ends, and makes a
// watch again, after a pause, whenever one could not be made or ended.
//
// A watch is an ordered consumer. nats.go makes it again after a gap or missed heartbeats,
// but a cluster can end it (a recreation JetStream refuses closes it) or leave its creation
// unanswered (seen for a minute after a stream's leader was killed): so each creation is
// bounded (watchBounded), and a watch that ends is made again.
func (b *Broker) keepWatching(ctx context.Context, what string, w jetstream.KeyWatcher,
	watch func(context.Context) (jetstream.KeyWatcher, error), follow func(context.Context, jetstream.KeyWatcher)) {
	pause := watchRetryMin
	for {
		var err error
		if w == nil {
			w, err = watch(ctx)
		}
		if w != nil {
			began := time.Now()
			follow(ctx, w)
			_ = w.Stop()
			w, err = nil, errors.New("the watch ended")
			if time.Since(began) > watchRetryMax {
				pause = watchRetryMin
			}
		}
		if ctx.Err() != nil {
			return
		}
		b.log.Warn("Watching "+what+" failed; watching again", logKeyRetryIn, pause, logKeyError, err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(2*pause, watchRetryMax)
	}
}

// watchBounded watches kv's keys that match filter until ctx ends or the watch is stopped,
// waiting storeCallTimeout at most for its creation. The watch lives as long as the context
// its creation is given, so that context is not the bounded one: a creation not answered in
// time is cancelled through it.
func watchBounded(ctx context.Context, kv jetstream.KeyValue, filter string, opts ...jetstream.WatchOpt) (jetstream.KeyWatcher, error) {
	wctx, cancel := context.WithCancel(ctx)
	type made struct {
		w   jetstream.KeyWatcher
		err error
	}
	ch := make(chan made, 1)
	go func() {
		w, err := kv.Watch(wctx, filter, opts...)
		ch <- made{w, err}
	}()
	t := time.NewTimer(storeCallTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		if r.err != nil {
			cancel()
			return nil, r.err
		}
		return &cancelWatcher{KeyWatcher: r.w, cancel: cancel}, nil
	case <-t.C:
		cancel()
		go func() {
			if r := <-ch; r.w != nil {
				_ = r.w.Stop()
			}
		}()
		return nil, fmt.Errorf("watching %s: %w: no answer within %v", kv.Bucket(), ErrUnavailable, storeCallTimeout)
	}
}

// cancelWatcher is a watch that also cancels the context it lives by when stopped.
type cancelWatcher struct {
	jetstream.KeyWatcher
	cancel context.CancelFunc
}

func (w *cancelWatcher) Stop() error {
	defer w.cancel()
	return w.KeyWatcher.Stop()
}

// followMigrations keeps the live view (live.go) and wakes the driver of every unfinished
// migration whose record w delivers, until ctx or w ends.
func (b *Broker) followMigrations(ctx context.Context, w jetstream.KeyWatcher) {
	b.live.watchBegan(time.Now())
	eachUpdate(ctx, w, func(e jetstream.KeyValueEntry) {
		if e == nil {
			return
		}
		if m := b.live.follow(e); m != nil && !m.Phase.Terminal() {
			b.drive(ctx, e.Key())
		}
		b.watched.Store(e.Revision())
	})
}

// eachUpdate calls f with every entry w delivers (nil: the end of its first delivery of every
// key) until ctx or w ends.
func eachUpdate(ctx context.Context, w jetstream.KeyWatcher, f func(jetstream.KeyValueEntry)) {
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			f(e)
		}
	}
}

// reconcileLoop looks, every CheckInterval, at every unfinished migration: one this broker
// drives gets its timeouts checked; one nobody holds is taken over. It reads the live view
// (live.go), which holds the live bucket only: ended migrations leave it for the archive
// after EndedGrace (archive.go), so a check costs in proportion to the migrations in flight,
// not to the history, and reads NATS only when the view is refilled.
func (b *Broker) reconcileLoop(ctx context.Context) error {
	t := time.NewTicker(b.cfg.CheckInterval)
	defer t.Stop()
	for {
		b.reconcile(ctx)
		b.reconcileOps(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (b *Broker) reconcile(ctx context.Context) {
	listed := time.Now()
	recs, err := b.liveRecords(ctx)
	if err != nil {
		if ctx.Err() == nil {
			b.log.Warn("Listing migrations failed", logKeyError, err)
			b.cfg.Metrics.NATSError(natsOpKVList)
		}
		return
	}
	unfinished := map[Phase]int{}
	active := map[string]activeMigration{}
	seen := map[string]bool{}
	for _, m := range recs {
		seen[m.ID] = true
		if !m.Phase.Terminal() {
			unfinished[m.Phase]++
			active[m.ID] = activeMigration{Source: m.Source, Destination: m.Destination, MemoryBytes: m.MemoryBytes}
		}
	}
	b.activeMu.Lock()
	for id, m := range b.active {
		switch {
		case seen[id]:
		case m.noted.After(listed): // created while the list was read
			active[id] = m
		case !m.missed: // missed by this listing: dropped if the next misses it too
			m.missed = true
			active[id] = m
		}
	}
	b.active = active
	b.activeMu.Unlock()
	b.cfg.Metrics.Unfinished(unfinished)
	now := b.now()
	for _, m := range recs {
		if m.Phase.Terminal() {
			continue
		}
		if m.Owner != "" && m.Owner != b.cfg.ID && m.LeaseUntil.After(now) {
			continue
		}
		// A driver that runs checks its own timeouts: waking a thousand of them every
		// interval would cost each a look at its hosts, for nothing.
		b.startDriver(ctx, m.ID)
	}
	b.archiveEnded(ctx, recs, now)
}

// noteActive adds a migration this broker just created to the snapshot of those in flight,
// so that placement counts it before reconcile next lists the bucket.
func (b *Broker) noteActive(m *Migration) {
	b.activeMu.Lock()
	b.active[m.ID] = activeMigration{Source: m.Source, Destination: m.Destination, MemoryBytes: m.MemoryBytes, noted: time.Now()}
	b.activeMu.Unlock()
}

// activeMigrations returns the snapshot of the migrations in flight, by id.
func (b *Broker) activeMigrations() map[string]activeMigration {
	b.activeMu.Lock()
	defer b.activeMu.Unlock()
	return maps.Clone(b.active)
}

// drive starts a driver for migration id, or wakes the one already running.
func (b *Broker) drive(ctx context.Context, id string) {
	b.startOrWake(ctx, b.driving, id, b.runDriver, b.forgetDriver(id), true)
}

// startDriver starts a driver for migration id unless one runs.
func (b *Broker) startDriver(ctx context.Context, id string) {
	b.startOrWake(ctx, b.driving, id, b.runDriver, b.forgetDriver(id), false)
}

// forgetDriver returns what to forget, under b.mu, when migration id's driver returns.
func (b *Broker) forgetDriver(id string) func() {
	return func() {
		delete(b.attached, id)
		b.unwait(id)
	}
}

// startOrWake wakes the driver of id in driving (if wake), or starts run as it, under ctx.
// When run returns, id leaves driving and forget runs, both under b.mu.
func (b *Broker) startOrWake(ctx context.Context, driving map[string]chan struct{}, id string, run func(context.Context, string, <-chan struct{}), forget func(), wake bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ctx == nil || ctx.Err() != nil {
		return
	}
	if ch, ok := driving[id]; ok {
		if wake {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
		return
	}
	ch := make(chan struct{}, 1)
	driving[id] = ch
	b.drivers.Add(1)
	go func() {
		defer b.drivers.Done()
		run(ctx, id, ch)
		b.mu.Lock()
		delete(driving, id)
		if forget != nil {
			forget()
		}
		b.mu.Unlock()
	}()
}

// publishEvent publishes ev on the migration's events subject (captured by LETHE_EVENTS).
func (b *Broker) publishEvent(ev Event) {
	ev.Time = b.now()
	ev.Broker = b.cfg.ID
	data, err := json.Marshal(ev)
	if err != nil {
		return
	}
	if err := b.nc.Publish(EventsSubject(ev.MigrationID), data); err != nil {
		b.log.Warn("Publishing event failed", logKeyMigration, ev.MigrationID, logKeyError, err)
		b.cfg.Metrics.NATSError(natsOpPublish)
	}
}

// newID returns a random id that is a valid NATS token and KV key.
func newID(prefix string) string { return prefix + rand.Text()[:20] }
