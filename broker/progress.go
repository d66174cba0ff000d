package broker

import (
	"context"
	"encoding/json"

	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/nats-io/nats.go"
)

// handleProgress records a progress report published by an agent. The subject names the
// publishing host (NATS permissions let an agent publish only under its own host), and only
// the migration's source is believed.
func (b *Broker) handleProgress(ctx context.Context, msg *nats.Msg) {
	host, id, ok := agentapi.ParseProgressSubject(msg.Subject)
	if !ok || len(msg.Data) > agentapi.MaxMessageSize {
		return
	}
	var p agentapi.Progress
	if err := json.Unmarshal(msg.Data, &p); err != nil {
		b.log.Warn("Decoding progress failed", logKeyHost, host, logKeyMigration, id, logKeyError, err)
		return
	}
	if p.MigrationID != "" && p.MigrationID != id {
		b.log.Warn("Progress names another migration than its subject", logKeyHost, host, logKeyMigration, id)
		return
	}
	p.MigrationID = id
	recorded, err := b.recordProgress(ctx, id, host, &p)
	if err != nil {
		if ctx.Err() == nil {
			b.log.Warn("Recording progress failed", logKeyMigration, id, logKeyError, err)
		}
		return
	}
	if recorded {
		b.publishEvent(Event{MigrationID: id, Kind: EventProgress, Progress: &p})
	}
}
