package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natsrpc"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// maxHeartbeatWriters bounds the heartbeats a broker stores at once: one at a time, a busy
// broker would fall behind the host TTL and hosts would look lost. A heartbeat over the bound
// is answered busy, and the agent sends the next one a heartbeat interval later.
const maxHeartbeatWriters = 32

// serveHeartbeats answers agents' heartbeats, sent on their hosts' heartbeat subjects, through
// the one request/response edge (natsrpc): a heartbeat is stored in the lethe-hosts bucket by
// storeHeartbeat. Only the broker writes that bucket: an agent allowed to publish on its own
// key could send a roll-up or purge header and wipe every host's record. The answer goes only
// to the inbox of the agent of the subject's host; a heartbeat with another reply subject is
// dropped, logged and counted.
func (b *Broker) serveHeartbeats(ctx context.Context) (*natsrpc.Server, error) {
	srv, err := natsrpc.Start(ctx, natsrpc.Config{
		Conn: b.nc, Name: "lethe-broker-heartbeats", Description: "Lethe broker: agents' heartbeats",
		Metadata: map[string]string{"id": b.cfg.ID}, QueueGroup: "lethe-broker",
		Endpoints: []natsrpc.Endpoint{{
			Name: "heartbeat", Subject: agentapi.HeartbeatWildcard,
			Handler: func(ctx context.Context, r *natsrpc.Request) (any, error) {
				host, _ := agentapi.ParseHeartbeatSubject(r.Subject) // the reply rule checked it
				rev, err := b.storeHeartbeat(ctx, host, r.Data)
				if err != nil {
					b.log.Warn("Heartbeat refused", logKeyHost, host, logKeyError, err)
					return nil, err
				}
				return agentapi.HeartbeatResponse{Revision: rev}, nil
			},
			Reply: func(subject, reply string) bool {
				host, ok := agentapi.ParseHeartbeatSubject(subject)
				return ok && replyAllowed(reply, natsauth.RoleAgent, host)
			},
		}},
		Public: func(err error) *wireerr.Error {
			switch {
			case errors.Is(err, errBadHeartbeat):
				return wireerr.New(agentapi.CodeBadRequest, err.Error())
			case errors.Is(err, ErrUnavailable):
				// JetStream did not store it in time: the agent sends it again.
				return wireerr.New(agentapi.CodeBusy, err.Error())
			}
			return nil
		},
		InvalidCode: agentapi.CodeBadRequest, BusyCode: agentapi.CodeBusy,
		MaxConcurrent: maxHeartbeatWriters, MaxRequest: agentapi.MaxMessageSize,
		Logger:  b.log,
		Refused: func(string, string) { b.cfg.Metrics.NATSError(natsOpReplyRefused) },
	})
	if err != nil {
		return nil, fmt.Errorf("serving heartbeats: %w", err)
	}
	return srv, nil
}

// heartbeatStoreTimeout bounds the write of one heartbeat: below the agent's bound on the
// whole heartbeat (its interval, 5 s by default), so that the agent hears why it failed and
// sends it again at once (agentapi.Heartbeater) instead of waiting out its own timeout.
const heartbeatStoreTimeout = 3 * time.Second

// errBadHeartbeat marks a heartbeat refused for what it holds, answered with its reason; a
// failure to store one is answered as internal.
var errBadHeartbeat = errors.New("bad heartbeat")

// storeHeartbeat checks a heartbeat of host and writes it into the hosts bucket.
func (b *Broker) storeHeartbeat(ctx context.Context, host string, data []byte) (uint64, error) {
	if len(data) > agentapi.MaxMessageSize {
		return 0, fmt.Errorf("%w: %d bytes exceeds %d", errBadHeartbeat, len(data), agentapi.MaxMessageSize)
	}
	var rec agentapi.HostRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		return 0, fmt.Errorf("%w: decoding: %w", errBadHeartbeat, err)
	}
	if rec.Host != host {
		return 0, fmt.Errorf("%w: on %s's subject, it names host %q", errBadHeartbeat, host, rec.Host)
	}
	clean, err := json.Marshal(&rec)
	if err != nil {
		return 0, fmt.Errorf("encoding host record: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, heartbeatStoreTimeout)
	defer cancel()
	rev, err := b.store.hosts.Put(ctx, host, clean)
	if err != nil {
		b.cfg.Metrics.NATSError(natsOpKVWrite)
		return 0, fmt.Errorf("storing host record: %w", storeError(err))
	}
	return rev, nil
}
