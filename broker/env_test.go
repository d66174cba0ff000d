package broker_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/broker/brokertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/agentapi/agentapitest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// clock is a test clock that moves only when told to.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

const (
	tenant   = "acme"
	vm       = "web"
	guestMiB = 1
)

// env is a NATS server with one or more brokers, fake agents and a fake keybroker.
type env struct {
	t      testing.TB
	srv    *natstest.Server
	clock  *clock
	kb     *brokertest.KeyBroker
	js     jetstream.JetStream
	agents map[string]*agentapitest.Agent
	// cfg is the base configuration of brokers started by startBroker.
	cfg broker.Config
	// connect opens connections; tests with authentication replace it.
	connect func(role natsauth.Role, name string) *nats.Conn
}

func newEnv(t testing.TB, opts natstest.Options) *env {
	t.Helper()
	e := &env{
		t:      t,
		srv:    natstest.Start(t, opts),
		clock:  newClock(),
		kb:     &brokertest.KeyBroker{},
		agents: map[string]*agentapitest.Agent{},
	}
	// Servers answer only on their callers' inboxes: each party connects with its own.
	e.connect = func(role natsauth.Role, name string) *nats.Conn {
		return e.srv.Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(role, name)))
	}
	e.cfg = broker.Config{
		KeyBroker:     e.kb,
		Now:           e.clock.Now,
		CheckInterval: 20 * time.Millisecond,
		HostTTL:       time.Hour,
		Lease:         30 * time.Second,
		AgentTimeout:  5 * time.Second,
		Logger:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	return e
}

func (e *env) jetstream() jetstream.JetStream {
	if e.js == nil {
		js, err := jetstream.New(e.connect(natsauth.RoleBrokerStore, ""))
		if err != nil {
			e.t.Fatal(err)
		}
		e.js = js
	}
	return e.js
}

func (e *env) kv(bucket string) jetstream.KeyValue {
	kv, err := e.jetstream().KeyValue(context.Background(), bucket)
	if err != nil {
		e.t.Fatalf("opening bucket %s: %v", bucket, err)
	}
	return kv
}

// startBroker starts a broker and returns it with a function that stops it and waits.
func (e *env) startBroker(id string) (*broker.Broker, func()) {
	e.t.Helper()
	cfg := e.cfg
	cfg.ID = id
	cfg.Conn = e.connect(natsauth.RoleBroker, "")
	cfg.StoreConn = e.connect(natsauth.RoleBrokerStore, "")
	b, err := broker.New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	select {
	case <-b.Ready():
	case err := <-done:
		done <- err // for stop, which waits for it
		e.t.Fatalf("broker %s stopped before ready: %v", id, err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("broker %s: %v", id, err)
			}
		})
	}
	e.t.Cleanup(stop)
	return b, stop
}

// addAgent starts a fake agent serving host and registers its host record.
func (e *env) addAgent(host string, platform attest.Platform, region string, labels map[string]string, guests ...agentapi.HostGuest) *agentapitest.Agent {
	e.t.Helper()
	a := agentapitest.New(host, platform)
	a.Now = e.clock.Now
	nc := e.connect(natsauth.RoleAgent, host)
	ctx, cancel := context.WithCancel(context.Background())
	stop, err := agentapi.Start(ctx, nc, host, a)
	if err != nil {
		cancel()
		e.t.Fatalf("serving agent %s: %v", host, err)
	}
	e.t.Cleanup(func() { cancel(); stop() })
	rec := a.Record(region, labels, guests...)
	if err := agentapi.PutHost(context.Background(), nc, &rec); err != nil {
		e.t.Fatalf("registering %s: %v", host, err)
	}
	if err := nc.Flush(); err != nil {
		e.t.Fatal(err)
	}
	e.agents[host] = a
	return a
}

func (e *env) tenant(name string) *broker.Client {
	return broker.NewTenantClient(e.connect(natsauth.RoleTenant, name), name)
}

func (e *env) operator() *broker.Client {
	return broker.NewOperatorClient(e.connect(natsauth.RoleOperator, ""))
}

// standard starts one broker and hosts h1 (with the guest), h2 and applies a policy and adopts
// the guest on h1.
func (e *env) standard() *broker.Broker {
	e.t.Helper()
	b, _ := e.startBroker("b1")
	g := agentapi.HostGuest{Tenant: tenant, VM: vm, MemoryBytes: guestMiB << 20}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, g)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil, g)
	e.adopt(tenant, vm, "h1")
	return b
}

func (e *env) adopt(tenant, vm, host string) {
	e.t.Helper()
	ctx := context.Background()
	if _, err := e.tenant(tenant).ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Envelope: []byte(`{"fake":"policy"}`)}); err != nil {
		e.t.Fatalf("applying policy: %v", err)
	}
	if _, err := e.tenant(tenant).AdoptGuest(ctx, &broker.AdoptGuestRequest{VM: vm, Host: host}); err != nil {
		e.t.Fatalf("adopting %s/%s: %v", tenant, vm, err)
	}
}

// waitMigration watches migration id until cond holds, and fails the test after 30 s.
func (e *env) waitMigration(id string, cond func(*broker.Migration) bool) *broker.Migration {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := e.kv(broker.MigrationsBucket).Watch(ctx, id)
	if err != nil {
		e.t.Fatal(err)
	}
	defer w.Stop()
	var last broker.Migration
	for {
		select {
		case <-ctx.Done():
			e.t.Fatalf("migration %s: condition not met; last phase %s (reason %q)", id, last.Phase, last.AbortReason)
		case entry := <-w.Updates():
			if entry == nil || entry.Operation() != jetstream.KeyValuePut {
				continue
			}
			var m broker.Migration
			if err := json.Unmarshal(entry.Value(), &m); err != nil {
				e.t.Fatal(err)
			}
			last = m
			if cond(&m) {
				return &m
			}
		}
	}
}

func inPhase(phases ...broker.Phase) func(*broker.Migration) bool {
	return func(m *broker.Migration) bool {
		for _, p := range phases {
			if m.Phase == p {
				return true
			}
		}
		return false
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// waitFleetOp returns fleet operation id as an operator gets it once cond holds, looking
// again whenever a record of the fleet or migrations bucket changes (an operation moves on
// only when one of them does); it fails the test after 60 s.
func (e *env) waitFleetOp(id string, cond func(*broker.FleetOpView) bool) *broker.FleetOpView {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	changed := make(chan struct{}, 1)
	for _, bucket := range []string{broker.FleetBucket, broker.MigrationsBucket} {
		w, err := e.kv(bucket).WatchAll(ctx, jetstream.UpdatesOnly())
		if err != nil {
			e.t.Fatal(err)
		}
		go func() {
			defer func() { _ = w.Stop() }()
			for range w.Updates() {
				select {
				case changed <- struct{}{}:
				default:
				}
			}
		}()
	}
	op := e.operator()
	for {
		v, err := op.GetFleetOp(ctx, id)
		if err != nil {
			e.t.Fatal(err)
		}
		if cond(v) {
			return v
		}
		select {
		case <-changed:
		case <-ctx.Done():
			e.t.Fatalf("operation %s still %s: %+v", id, v.State, v.Counts)
		}
	}
}

// opEnded is a waitFleetOp condition: the operation is done or aborted.
func opEnded(v *broker.FleetOpView) bool { return v.State.Terminal() }
