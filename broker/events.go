package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// maxEventsReply bounds the bytes of events in one migrations.events reply, well under
// NATS's default maximum payload.
const maxEventsReply = 256 << 10

// eventsConsumerIdle is how long the server keeps the consumer of a page of events unused.
const eventsConsumerIdle = 5 * time.Second

// migrationEvents returns a page of the events of a migration the caller sees, read from
// stream LETHE_EVENTS with the broker's own connection: tenants have no JetStream rights, and
// read their migrations' events through this op only.
func (b *Broker) migrationEvents(ctx context.Context, c Caller, req *MigrationEventsRequest) (*MigrationEventsResponse, error) {
	if _, _, err := b.visibleMigration(ctx, c, req.ID); err != nil {
		return nil, err
	}
	limit := req.Limit
	if limit <= 0 || limit > MaxEventsPage {
		limit = MaxEventsPage
	}
	// An ephemeral consumer per page, which the server drops soon after (a follower asks for a
	// page every 500 ms: with the default of 5 min, thousands would linger).
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{EventsSubject(req.ID)}, DeliverPolicy: jetstream.DeliverAllPolicy,
		InactiveThreshold: eventsConsumerIdle,
	}
	if req.After > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, req.After+1
	}
	cons, err := b.store.js.OrderedConsumer(ctx, EventsStream, cfg)
	if err != nil {
		return nil, fmt.Errorf("reading events of %s: %w", req.ID, err)
	}
	// One more than the page holds, to tell whether there are more.
	batch, err := cons.FetchNoWait(limit + 1)
	if err != nil {
		return nil, fmt.Errorf("reading events of %s: %w", req.ID, err)
	}
	resp := &MigrationEventsResponse{Events: []StoredEvent{}, Next: req.After}
	size := 0
	for msg := range batch.Messages() {
		if len(resp.Events) == limit || size+len(msg.Data()) > maxEventsReply {
			resp.More = true
			continue // drain the batch
		}
		meta, err := msg.Metadata()
		if err != nil {
			return nil, fmt.Errorf("reading events of %s: %w", req.ID, err)
		}
		var ev Event
		if err := json.Unmarshal(msg.Data(), &ev); err != nil {
			b.log.Warn("Decoding a stored event failed", logKeyMigration, req.ID, logKeyError, err)
			resp.Next = meta.Sequence.Stream
			continue
		}
		size += len(msg.Data())
		resp.Events = append(resp.Events, StoredEvent{Seq: meta.Sequence.Stream, Event: ev})
		resp.Next = meta.Sequence.Stream
	}
	if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
		return nil, fmt.Errorf("reading events of %s: %w", req.ID, err)
	}
	return resp, nil
}

// policyKey returns the key of the tenant-wide policy of tenant, or with vm of its
// VM-specific one, for a caller who may act for tenant.
func policyKey(c Caller, tenant, vm string) (string, string, error) {
	t, err := c.tenantFor(tenant)
	if err != nil {
		return "", "", err
	}
	if vm == "" {
		return t, t, nil
	}
	if err := validVM(vm); err != nil {
		return "", "", err
	}
	return t, GuestKey(t, vm), nil
}

// getPolicy returns the policy that applies: with a VM, the VM's own or else the tenant-wide
// one, as migrations use it; without, the tenant-wide one. None matches ErrNotFound.
func (b *Broker) getPolicy(ctx context.Context, c Caller, req *GetPolicyRequest) (*PolicyView, error) {
	tenant, key, err := policyKey(c, req.Tenant, req.VM)
	if err != nil {
		return nil, err
	}
	keys := []string{key}
	if key != tenant {
		keys = append(keys, tenant)
	}
	for _, k := range keys {
		p, rev, err := getJSON[PolicyRecord](ctx, b.store.policies, k)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return &PolicyView{Key: k, Revision: rev, PolicyRecord: *p}, nil
	}
	if req.VM != "" {
		return nil, fmt.Errorf("%w: no policy for tenant %s vm %s", ErrNotFound, tenant, req.VM)
	}
	return nil, fmt.Errorf("%w: no policy for tenant %s", ErrNotFound, tenant)
}

// policyHistory returns the revisions the lethe-policies bucket keeps of one policy key,
// oldest first. A key never written matches ErrNotFound.
func (b *Broker) policyHistory(ctx context.Context, c Caller, req *PolicyHistoryRequest) (*PolicyHistoryResponse, error) {
	_, key, err := policyKey(c, req.Tenant, req.VM)
	if err != nil {
		return nil, err
	}
	entries, err := b.store.policies.History(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("%w: no policy %q", ErrNotFound, key)
	}
	if err != nil {
		return nil, fmt.Errorf("reading the history of policy %q: %w", key, err)
	}
	resp := &PolicyHistoryResponse{Revisions: []PolicyView{}}
	for _, e := range entries {
		if e.Operation() != jetstream.KeyValuePut {
			continue
		}
		var p PolicyRecord
		if err := json.Unmarshal(e.Value(), &p); err != nil {
			return nil, fmt.Errorf("decoding policy %q revision %d: %w", key, e.Revision(), err)
		}
		resp.Revisions = append(resp.Revisions, PolicyView{Key: key, Revision: e.Revision(), PolicyRecord: p})
	}
	return resp, nil
}
