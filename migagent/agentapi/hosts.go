package agentapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natsrpc"
)

// PutHost sends rec as a heartbeat on its host's heartbeat subject and waits until a broker
// has written it into the lethe-hosts bucket under rec.Host. The agent's NATS user needs no
// JetStream permission at all: only the broker writes the bucket, and it stores a record only
// under the host whose subject it came on. An error reply is a *wireerr.Error (CodeBadRequest);
// with no broker running the error matches nats.ErrNoResponders.
func PutHost(ctx context.Context, nc *nats.Conn, rec *HostRecord) error {
	if err := ValidName(rec.Host); err != nil {
		return fmt.Errorf("putting host record: %w", err)
	}
	// The broker answers only under the host's own inbox prefix, whatever the connection's.
	ack, err := natsrpc.Call[*HostRecord, HeartbeatResponse](ctx, nc, HeartbeatSubject(rec.Host), rec,
		natsrpc.WithTimeout(DefaultTimeout), natsrpc.WithMaxResponse(MaxMessageSize),
		natsrpc.WithReplyPrefix(natsauth.InboxPrefix(natsauth.RoleAgent, rec.Host)+"."))
	if err != nil {
		return fmt.Errorf("putting host record of %s: %w", rec.Host, withSentinel(err))
	}
	if ack.Revision == 0 {
		return errors.New("putting host record: no acknowledgement")
	}
	return nil
}

// HeartbeatResponse is the broker's answer to a heartbeat: the revision of the stored record.
type HeartbeatResponse struct {
	Revision uint64 `json:"revision"`
}

// HeartbeaterConfig configures a Heartbeater.
type HeartbeaterConfig struct {
	// Conn is the agent's NATS connection. Required.
	Conn *nats.Conn
	// Record returns the host record to write at each heartbeat (its Heartbeat field is set by
	// the Heartbeater). Required.
	Record func() HostRecord
	// Interval between heartbeats. Zero means 5 s; it must stay well below the bucket's TTL.
	Interval time.Duration
	// Now returns the current time. Nil means time.Now.
	Now func() time.Time
	// Logger receives failed heartbeats. Nil means slog.Default().
	Logger *slog.Logger
}

// Heartbeater keeps an agent's host record fresh.
type Heartbeater struct{ cfg HeartbeaterConfig }

// NewHeartbeater returns a Heartbeater, or an error if cfg lacks a required field.
func NewHeartbeater(cfg HeartbeaterConfig) (*Heartbeater, error) {
	if cfg.Conn == nil || cfg.Record == nil {
		return nil, errors.New("creating heartbeater: Conn and Record are required")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Heartbeater{cfg: cfg}, nil
}

// Beat writes the host record once.
func (h *Heartbeater) Beat(ctx context.Context) error {
	rec := h.cfg.Record()
	rec.Heartbeat = h.cfg.Now()
	return PutHost(ctx, h.cfg.Conn, &rec)
}

// Run writes the host record at once and then every interval until ctx ends. A failed
// heartbeat is logged and retried at the next interval; Run returns nil when ctx ends.
func (h *Heartbeater) Run(ctx context.Context) error {
	t := time.NewTicker(h.cfg.Interval)
	defer t.Stop()
	for {
		if err := h.Beat(ctx); err != nil && ctx.Err() == nil {
			h.cfg.Logger.Warn("Heartbeat failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
