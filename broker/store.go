package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"
)

// Names of the broker's JetStream buckets and stream.
const (
	MigrationsBucket = natsauth.MigrationsBucket
	HostsBucket      = natsauth.HostsBucket
	PoliciesBucket   = natsauth.PoliciesBucket
	GuestsBucket     = natsauth.GuestsBucket
	ReceiptsBucket   = natsauth.ReceiptsBucket
	FleetBucket      = natsauth.FleetBucket
	EventsStream     = "LETHE_EVENTS"
	// AuditStream keeps the audit records of the broker and the keybroker (docs/audit.md).
	AuditStream = natsauth.AuditStream
)

// auditMaxConsumers bounds the consumers of AuditStream, all of them auditors' readers
// (lethectl audit tail, the nats CLI): what an auditor may create is bounded by it.
const auditMaxConsumers = 64

// store holds the broker's JetStream state.
type store struct {
	js         jetstream.JetStream
	migrations jetstream.KeyValue
	hosts      jetstream.KeyValue
	policies   jetstream.KeyValue
	guests     jetstream.KeyValue
	receipts   jetstream.KeyValue
	fleet      jetstream.KeyValue
	archive    jetstream.KeyValue
}

// storeConfig sizes the buckets.
type storeConfig struct {
	replicas        int
	hostTTL         time.Duration
	eventsRetention time.Duration
	auditRetention  time.Duration
	// archiveRetention and receiptRetention are the TTLs of the archive and the receipts'
	// buckets; zero keeps their records for ever.
	archiveRetention time.Duration
	receiptRetention time.Duration
	// log reports each creation of a stream tried again; nil logs nothing.
	log *slog.Logger
}

// Pauses between two tries of a stream's creation: the first, doubled after each try up to
// the last. The first try waits createFirstWait for JetStream's answer, each next one twice
// as long up to storeCallTimeout: a creation takes milliseconds, and one left unanswered
// (see createStream) is done when tried again.
const (
	createRetryMin  = 100 * time.Millisecond
	createRetryMax  = 2 * time.Second
	createFirstWait = time.Second
)

// openBucket opens bucket, just created, trying again while ctx lives when JetStream does not
// answer in time or does not know it yet: the node that answers may not have learnt of a
// stream another broker's creation made.
func openBucket(ctx context.Context, js jetstream.JetStream, bucket string, log *slog.Logger) (jetstream.KeyValue, error) {
	var kv jetstream.KeyValue
	err := retryStore(ctx, log, "KV_"+bucket, func(ctx context.Context) (err error) {
		kv, err = js.KeyValue(ctx, bucket)
		return err
	}, func(err error) bool {
		return storeUnavailable(err) || errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound)
	})
	return kv, err
}

// createStream creates stream cfg, or updates it to cfg, trying again while ctx lives when
// JetStream does not answer in time (see createFirstWait) or says the stream is in
// use. Two brokers starting together create the same clustered streams at once, and
// nats-server may answer neither creation (nats-server issue #3677), or one broker's update
// may find the stream the other one is creating: the stream exists once one creation went
// through, and the next try finds it and updates it to the same configuration.
func createStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig, log *slog.Logger) error {
	return retryStore(ctx, log, cfg.Name, func(ctx context.Context) error {
		_, err := js.CreateOrUpdateStream(ctx, cfg)
		return err
	}, func(err error) bool {
		return storeUnavailable(err) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) || noPeersYet(err)
	})
}

// noPeersYet says JetStream could not place a replicated stream: "no suitable peers for
// placement", which a cluster just started answers until its meta leader has heard from every
// peer (seen in CI on a fresh three-node cluster). A cluster smaller than the replicas asked
// for answers the same for good: the broker then keeps trying, not ready, and logs it.
func noPeersYet(err error) bool {
	e, ok := errors.AsType[*jetstream.APIError](err)
	return ok && e.ErrorCode == jsErrCodeClusterNoPeers
}

// jsErrCodeClusterNoPeers is nats-server's JSClusterNoPeersErrF, which nats.go names not.
const jsErrCodeClusterNoPeers jetstream.ErrorCode = 10005

// retryStore calls f until it succeeds, or fails with an error again does not accept, or ctx
// ends; each try waits createFirstWait for JetStream, twice as long as the one before up to
// storeCallTimeout, and each failure is logged with stream, the stream f works on.
func retryStore(ctx context.Context, log *slog.Logger, stream string, f func(context.Context) error, again func(error) bool) error {
	pause, wait := createRetryMin, createFirstWait
	for try := 1; ; try++ {
		tctx, cancel := context.WithTimeout(ctx, wait)
		err := f(tctx)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil || !again(err) {
			return err
		}
		if log != nil {
			log.Warn("Creating or opening a stream failed; trying again", logKeyStream, stream, logKeyTry, try, logKeyRetryIn, pause, logKeyError, err)
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(pause):
		}
		pause, wait = min(2*pause, createRetryMax), min(2*wait, storeCallTimeout)
	}
}

// openStore creates (or updates) the buckets and the events stream and returns handles on them.
//
// Every bucket's stream refuses direct gets (AllowDirect false), and its handle is bound
// after that, so that each Get goes to the stream's leader. A direct get may be answered by
// any replica, one behind the last acknowledged write among them: the broker decides its side
// effects (an agent's attestation, a key release) on what it reads and then writes with a
// compare-and-swap, and a stale read would make it run them again. The buckets' streams are
// written from storeStreamConfig, never by the key-value API's create or update, which turns
// direct gets back on: a broker starting beside running ones leaves them as they are.
func openStore(ctx context.Context, js jetstream.JetStream, cfg storeConfig) (*store, error) {
	s := &store{js: js}
	buckets := []struct {
		kv  *jetstream.KeyValue
		cfg jetstream.KeyValueConfig
	}{
		{&s.migrations, jetstream.KeyValueConfig{Bucket: MigrationsBucket, Description: "Lethe migration records", History: 5}},
		{&s.hosts, jetstream.KeyValueConfig{Bucket: HostsBucket, Description: "Lethe host records and heartbeats", History: 1, TTL: cfg.hostTTL}},
		{&s.policies, jetstream.KeyValueConfig{Bucket: PoliciesBucket, Description: "Lethe signed tenant policies", History: 5}},
		{&s.guests, jetstream.KeyValueConfig{Bucket: GuestsBucket, Description: "Lethe guests: host, epoch, wrapped memory key", History: 5}},
		{&s.receipts, jetstream.KeyValueConfig{Bucket: ReceiptsBucket, Description: "Lethe signed receipts", History: 1, TTL: cfg.receiptRetention}},
		{&s.fleet, jetstream.KeyValueConfig{Bucket: FleetBucket, Description: "Lethe host states and fleet operations", History: 5}},
		{&s.archive, jetstream.KeyValueConfig{Bucket: ArchiveBucket, Description: "Lethe ended migrations, out of the live set", History: 1, TTL: cfg.archiveRetention}},
	}
	for _, b := range buckets {
		b.cfg.Replicas = cfg.replicas
		b.cfg.Storage = jetstream.FileStorage
		if err := createStream(ctx, js, storeStreamConfig(b.cfg), cfg.log); err != nil {
			return nil, fmt.Errorf("creating bucket %s: %w", b.cfg.Bucket, err)
		}
		kv, err := openBucket(ctx, js, b.cfg.Bucket, cfg.log)
		if err != nil {
			return nil, fmt.Errorf("opening bucket %s: %w", b.cfg.Bucket, err)
		}
		*b.kv = kv
	}
	err := createStream(ctx, js, jetstream.StreamConfig{
		Name:        EventsStream,
		Description: "Lethe migration events: transitions, progress, audit",
		Subjects:    []string{EventsSubjectPrefix + ".>"},
		MaxAge:      cfg.eventsRetention,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.replicas,
	}, cfg.log)
	if err != nil {
		return nil, fmt.Errorf("creating stream %s: %w", EventsStream, err)
	}
	// The audit stream refuses message deletes and purges, even to the broker: records leave
	// it by age alone.
	err = createStream(ctx, js, jetstream.StreamConfig{
		Name:         AuditStream,
		Description:  "Lethe audit records of the broker and the keybroker (docs/audit.md)",
		Subjects:     []string{natsauth.AuditSubjectPrefix + ".>"},
		MaxAge:       cfg.auditRetention,
		MaxConsumers: auditMaxConsumers,
		DenyDelete:   true,
		DenyPurge:    true,
		Storage:      jetstream.FileStorage,
		Replicas:     cfg.replicas,
	}, cfg.log)
	if err != nil {
		return nil, fmt.Errorf("creating stream %s: %w", AuditStream, err)
	}
	return s, nil
}

// storeStreamConfig is the stream of key-value bucket cfg as nats.go's key-value API writes it
// (jetstream's prepareKeyValueConfig, for a bucket that neither mirrors nor sources), except
// that it refuses direct gets: see openStore.
func storeStreamConfig(cfg jetstream.KeyValueConfig) jetstream.StreamConfig {
	history := int64(max(cfg.History, 1))
	// The duplicate window is the key-value API's: 2 minutes, or the TTL when shorter.
	duplicates := 2 * time.Minute
	if cfg.TTL > 0 && cfg.TTL < duplicates {
		duplicates = cfg.TTL
	}
	return jetstream.StreamConfig{
		Name:              "KV_" + cfg.Bucket,
		Description:       cfg.Description,
		Subjects:          []string{"$KV." + cfg.Bucket + ".>"},
		MaxMsgsPerSubject: history,
		MaxBytes:          -1,
		MaxAge:            cfg.TTL,
		MaxMsgSize:        -1,
		Storage:           cfg.Storage,
		Replicas:          max(cfg.Replicas, 1),
		AllowRollup:       true,
		DenyDelete:        true,
		Duplicates:        duplicates,
		MaxMsgs:           -1,
		MaxConsumers:      -1,
		AllowDirect:       false,
		Discard:           jetstream.DiscardNew,
	}
}

// storeCallTimeout bounds one read or write of a record, within the caller's deadline: one
// takes milliseconds, and a cluster that cannot answer in this long has lost its quorum or is
// electing a leader. An API request then answers "unavailable" well before its caller gives up
// (natsrpc's and the Client's 30 s), and a migration's driver tries again.
const storeCallTimeout = 5 * time.Second

// getJSON reads key from kv into a new T. A missing key matches ErrNotFound; JetStream not
// answering within storeCallTimeout, ErrUnavailable.
func getJSON[T any](ctx context.Context, kv jetstream.KeyValue, key string) (*T, uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, storeCallTimeout)
	defer cancel()
	e, err := kv.Get(ctx, key)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			return nil, 0, fmt.Errorf("%w: %s %q", ErrNotFound, kv.Bucket(), key)
		}
		return nil, 0, fmt.Errorf("reading %s %q: %w", kv.Bucket(), key, storeError(err))
	}
	v := new(T)
	if err := json.Unmarshal(e.Value(), v); err != nil {
		return nil, 0, fmt.Errorf("decoding %s %q: %w", kv.Bucket(), key, err)
	}
	return v, e.Revision(), nil
}

// errRevision is a lost compare-and-swap.
var errRevision = errors.New("revision changed")

// updateJSON writes v under key if the key is still at rev (0: if the key does not exist).
// A lost race matches errRevision; JetStream not answering within storeCallTimeout,
// ErrUnavailable.
func updateJSON(ctx context.Context, kv jetstream.KeyValue, key string, v any, rev uint64) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, storeCallTimeout)
	defer cancel()
	data, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encoding %s %q: %w", kv.Bucket(), key, err)
	}
	var n uint64
	if rev == 0 {
		n, err = kv.Create(ctx, key, data)
	} else {
		n, err = kv.Update(ctx, key, data, rev)
	}
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return 0, fmt.Errorf("writing %s %q: %w", kv.Bucket(), key, errRevision)
		}
		return 0, fmt.Errorf("writing %s %q: %w", kv.Bucket(), key, storeError(err))
	}
	return n, nil
}

// listJSON reads every value of kv whose key matches filter (">" for all) in one pass of an
// ordered consumer, rather than one request per key. It can miss a key rewritten while it
// reads: in a bucket that keeps one revision (the hosts', at every heartbeat) the revision
// the listing started from is gone, and the new one comes after the listing ends. Callers
// that need one key read it by name (getJSON), those that need every host listHosts; the
// others see it at their next listing.
func listJSON[T any](ctx context.Context, kv jetstream.KeyValue, filter string) ([]*T, error) {
	entries, err := listEntries[T](ctx, kv, filter)
	if err != nil {
		return nil, err
	}
	out := make([]*T, len(entries))
	for i, e := range entries {
		out[i] = e.value
	}
	return out, nil
}

// kvEntry is a decoded value of a bucket with its key and revision.
type kvEntry[T any] struct {
	key   string
	rev   uint64
	value *T
}

// listEntries is listJSON with each value's key and revision.
func listEntries[T any](ctx context.Context, kv jetstream.KeyValue, filter string) ([]kvEntry[T], error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	w, err := kv.Watch(ctx, filter, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", kv.Bucket(), storeError(err))
	}
	defer w.Stop()
	var out []kvEntry[T]
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("listing %s: %w", kv.Bucket(), storeError(ctx.Err()))
		case e, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("listing %s: watcher closed", kv.Bucket())
			}
			if e == nil { // all current values delivered
				return out, nil
			}
			v := new(T)
			if err := json.Unmarshal(e.Value(), v); err != nil {
				return nil, fmt.Errorf("decoding %s %q: %w", kv.Bucket(), e.Key(), err)
			}
			out = append(out, kvEntry[T]{key: e.Key(), rev: e.Revision(), value: v})
		}
	}
}

// listHosts reads every host record by name. The names come from the hosts bucket's stream,
// which its leader tells at once (the subjects it holds), and each record is then read like
// any other (getJSON). listJSON can miss a host whose heartbeat rewrites its record while the
// listing runs (see there): under the heartbeats of many hosts, placement and fleet
// operations would then skip a live host. A host whose record goes away between the two
// steps is left out.
func (s *store) listHosts(ctx context.Context) ([]*agentapi.HostRecord, error) {
	ctx, cancel := context.WithTimeout(ctx, storeCallTimeout)
	defer cancel()
	stream, err := s.js.Stream(ctx, "KV_"+HostsBucket)
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", HostsBucket, storeError(err))
	}
	prefix := "$KV." + HostsBucket + "."
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(prefix+">"))
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", HostsBucket, storeError(err))
	}
	names := make([]string, 0, len(info.State.Subjects))
	for subject := range info.State.Subjects {
		names = append(names, strings.TrimPrefix(subject, prefix))
	}
	slices.Sort(names)
	recs := make([]*agentapi.HostRecord, len(names))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(listReaders)
	for i, name := range names {
		g.Go(func() error {
			rec, _, err := getJSON[agentapi.HostRecord](gctx, s.hosts, name)
			if errors.Is(err, ErrNotFound) {
				return nil
			}
			recs[i] = rec
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return slices.DeleteFunc(recs, func(r *agentapi.HostRecord) bool { return r == nil }), nil
}

// listReaders bounds the reads by name of one listing at once.
const listReaders = 16

// storeError returns err, a failure of a JetStream call, marked with ErrUnavailable when it
// says JetStream could not answer (no quorum or leader, no connection, no answer in time)
// rather than what was asked is wrong: the API then answers "unavailable" with the cause,
// and the caller may try again.
func storeError(err error) error {
	if err == nil || !storeUnavailable(err) {
		return err
	}
	return &unavailableError{err: err}
}

// storeUnavailable reports whether err, a failure of a JetStream call, says JetStream could
// not answer.
func storeUnavailable(err error) bool {
	for _, e := range []error{
		context.DeadlineExceeded, nats.ErrTimeout, nats.ErrNoResponders, nats.ErrConnectionClosed,
		nats.ErrConnectionDraining, nats.ErrDisconnected, nats.ErrConnectionReconnecting,
		jetstream.ErrNoStreamResponse, jetstream.ErrServerShutdown,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	// JetStream's own "temporarily unavailable" answers: no meta leader or stream leader,
	// cluster without quorum.
	if e, ok := errors.AsType[*jetstream.APIError](err); ok && e.Code == 503 {
		return true
	}
	return false
}

// unavailableError is a store failure that matches ErrUnavailable as well as its cause.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string   { return "JetStream unavailable: " + e.err.Error() }
func (e *unavailableError) Unwrap() []error { return []error{ErrUnavailable, e.err} }
