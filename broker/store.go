package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/nats-io/nats.go/jetstream"
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
}

// openStore creates (or updates) the buckets and the events stream and returns handles on them.
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
		kv, err := js.CreateOrUpdateKeyValue(ctx, b.cfg)
		if err != nil {
			return nil, fmt.Errorf("creating bucket %s: %w", b.cfg.Bucket, err)
		}
		*b.kv = kv
	}
	_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        EventsStream,
		Description: "Lethe migration events: transitions, progress, audit",
		Subjects:    []string{EventsSubjectPrefix + ".>"},
		MaxAge:      cfg.eventsRetention,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("creating stream %s: %w", EventsStream, err)
	}
	// The audit stream refuses message deletes and purges, even to the broker: records leave
	// it by age alone.
	_, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:         AuditStream,
		Description:  "Lethe audit records of the broker and the keybroker (docs/audit.md)",
		Subjects:     []string{natsauth.AuditSubjectPrefix + ".>"},
		MaxAge:       cfg.auditRetention,
		MaxConsumers: auditMaxConsumers,
		DenyDelete:   true,
		DenyPurge:    true,
		Storage:      jetstream.FileStorage,
		Replicas:     cfg.replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("creating stream %s: %w", AuditStream, err)
	}
	return s, nil
}

// getJSON reads key from kv into a new T. A missing key matches ErrNotFound.
func getJSON[T any](ctx context.Context, kv jetstream.KeyValue, key string) (*T, uint64, error) {
	e, err := kv.Get(ctx, key)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			return nil, 0, fmt.Errorf("%w: %s %q", ErrNotFound, kv.Bucket(), key)
		}
		return nil, 0, fmt.Errorf("reading %s %q: %w", kv.Bucket(), key, err)
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
// A lost race matches errRevision.
func updateJSON(ctx context.Context, kv jetstream.KeyValue, key string, v any, rev uint64) (uint64, error) {
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
		return 0, fmt.Errorf("writing %s %q: %w", kv.Bucket(), key, err)
	}
	return n, nil
}

// listJSON reads every value of kv whose key matches filter (">" for all) in one pass of an
// ordered consumer, rather than one request per key. It can miss a key rewritten while it
// reads: in a bucket that keeps one revision (the hosts', at every heartbeat) the revision
// the listing started from is gone, and the new one comes after the listing ends. Callers
// that need one key read it by name (getJSON); the others see it at their next listing.
func listJSON[T any](ctx context.Context, kv jetstream.KeyValue, filter string) ([]*T, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	w, err := kv.Watch(ctx, filter, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", kv.Bucket(), err)
	}
	defer w.Stop()
	var out []*T
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("listing %s: %w", kv.Bucket(), ctx.Err())
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
			out = append(out, v)
		}
	}
}
