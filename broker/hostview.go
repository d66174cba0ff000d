package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// The host records a broker sees: every broker watches the hosts bucket (watchHosts) and keeps
// the latest record of each host (Broker.hostRecs), so that a driver's look at its hosts (are
// they live, how many migrations do they take) decodes nothing. A host of a thousand guests
// has a record of tens of KiB, and its heartbeat rewrites it every few seconds; read from the
// bucket at every look of every driver, decoding it took a quarter of a busy broker's CPU.
//
// The view serves only a driver's frequent looks (is the host live, how many migrations does
// it take), where a record a watch left behind by up to a host TTL costs nothing: what a
// request or a key release is judged on (the guests a host reports, its labels) is read from
// the bucket. The view answers only what it can answer truthfully: a record it holds with a
// fresh heartbeat. A host it does not hold (a watch's first delivery can miss a key rewritten while
// it runs: see listJSON), or holds with a stale heartbeat (its watch may have stalled), is read
// from the bucket, so that the view never makes a live host look lost.

// watchHosts keeps the view of the host records until ctx ends.
func (b *Broker) watchHosts(ctx context.Context) {
	b.keepWatching(ctx, "the hosts", nil, func(ctx context.Context) (jetstream.KeyWatcher, error) {
		return watchBounded(ctx, b.store.hosts, ">")
	}, b.followHosts)
}

// followHosts applies what w delivers to the view until ctx or w ends; the view is emptied
// when it ends, and counts only from w's first delivery of every record.
func (b *Broker) followHosts(ctx context.Context, w jetstream.KeyWatcher) {
	defer b.setHostRecs(nil)
	recs := map[string]*agentapi.HostRecord{}
	eachUpdate(ctx, w, func(e jetstream.KeyValueEntry) {
		if e == nil {
			b.setHostRecs(recs)
			return
		}
		rec := new(agentapi.HostRecord)
		b.hostRecsMu.Lock()
		if e.Operation() != jetstream.KeyValuePut || json.Unmarshal(e.Value(), rec) != nil {
			delete(recs, e.Key())
		} else {
			recs[e.Key()] = rec
		}
		b.hostRecsMu.Unlock()
	})
}

// setHostRecs makes recs the view (nil: none).
func (b *Broker) setHostRecs(recs map[string]*agentapi.HostRecord) {
	b.hostRecsMu.Lock()
	b.hostRecs = recs
	b.hostRecsMu.Unlock()
}

// hostRecord returns host's record, from the view when it holds one with a fresh heartbeat,
// or else from the bucket (ErrNotFound: not registered). The record is shared: not to be
// changed.
func (b *Broker) hostRecord(ctx context.Context, host string) (*agentapi.HostRecord, error) {
	b.hostRecsMu.Lock()
	rec := b.hostRecs[host]
	b.hostRecsMu.Unlock()
	if rec != nil {
		if live, _ := b.fresh(rec, b.now()); live {
			return rec, nil
		}
	}
	rec, _, err := getJSON[agentapi.HostRecord](ctx, b.store.hosts, host)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("reading host %s: %w", host, err)
	}
	return rec, err
}
