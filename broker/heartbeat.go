package broker

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// maxHeartbeatWriters bounds the heartbeats a broker stores at once.
const maxHeartbeatWriters = 32

// handleHeartbeat stores an agent's host record, sent on its heartbeat subject, in the
// lethe-hosts bucket. Only the broker writes that bucket: an agent allowed to publish on its
// own key could send a roll-up or purge header and wipe every host's record. The record must
// name the host of the subject, which only that host's agent may publish on; it is re-encoded,
// so that nothing but a host record's fields is stored. The answer goes only to that agent's
// inbox; a heartbeat with another reply subject is dropped, logged and counted.
func (b *Broker) handleHeartbeat(ctx context.Context, m *nats.Msg) {
	host, ok := agentapi.ParseHeartbeatSubject(m.Subject)
	if !ok {
		b.refuseReply(m.Subject, m.Reply, "not a heartbeat subject")
		return
	}
	if !replyAllowed(m.Reply, natsauth.RoleAgent, host) {
		b.refuseReply(m.Subject, m.Reply, "reply subject is not the agent's inbox")
		return
	}
	rev, err := b.storeHeartbeat(ctx, host, m.Data)
	if err != nil {
		b.log.Warn("Heartbeat refused", logKeyHost, host, logKeyError, err)
		reply := nats.NewMsg(m.Reply)
		reply.Header.Set(micro.ErrorCodeHeader, string(agentapi.CodeBadRequest))
		reply.Header.Set(micro.ErrorHeader, err.Error())
		_ = b.nc.PublishMsg(reply)
		return
	}
	data, _ := json.Marshal(agentapi.HeartbeatResponse{Revision: rev})
	if err := m.Respond(data); err != nil {
		b.log.Warn("Answering a heartbeat failed", logKeyHost, host, logKeyError, err)
	}
}

// storeHeartbeat checks a heartbeat of host and writes it into the hosts bucket.
func (b *Broker) storeHeartbeat(ctx context.Context, host string, data []byte) (uint64, error) {
	if len(data) > agentapi.MaxMessageSize {
		return 0, fmt.Errorf("heartbeat of %d bytes exceeds %d", len(data), agentapi.MaxMessageSize)
	}
	var rec agentapi.HostRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		return 0, fmt.Errorf("decoding heartbeat: %w", err)
	}
	if rec.Host != host {
		return 0, fmt.Errorf("heartbeat on %s's subject names host %q", host, rec.Host)
	}
	clean, err := json.Marshal(&rec)
	if err != nil {
		return 0, fmt.Errorf("encoding host record: %w", err)
	}
	rev, err := b.store.hosts.Put(ctx, host, clean)
	if err != nil {
		b.cfg.Metrics.NATSError(natsOpKVWrite)
		return 0, fmt.Errorf("storing host record: %w", err)
	}
	return rev, nil
}
