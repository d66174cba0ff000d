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
	// Timeout bounds one heartbeat, so that a heartbeat lost with a NATS server that went
	// away is sent again long before the host's TTL runs out, rather than waited for as long
	// as the TTL itself. Zero means Interval.
	Timeout time.Duration
	// RetryInterval is the time before a heartbeat that failed is sent again. Zero means a
	// fifth of Interval.
	RetryInterval time.Duration
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
	if cfg.Timeout <= 0 {
		cfg.Timeout = cfg.Interval
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = cfg.Interval / 5
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Heartbeater{cfg: cfg}, nil
}

// Beat writes the host record once, within Timeout.
func (h *Heartbeater) Beat(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Timeout)
	defer cancel()
	rec := h.cfg.Record()
	rec.Heartbeat = h.cfg.Now()
	return PutHost(ctx, h.cfg.Conn, &rec)
}

// Next returns how long to wait, after a heartbeat that returned err, before the next one:
// Interval after a heartbeat that went through, RetryInterval after one that failed.
func (h *Heartbeater) Next(err error) time.Duration {
	if err != nil {
		return h.cfg.RetryInterval
	}
	return h.cfg.Interval
}

// Run writes the host record at once and then every interval until ctx ends. A failed
// heartbeat is logged and sent again after RetryInterval; Run returns nil when ctx ends.
func (h *Heartbeater) Run(ctx context.Context) error {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		err := h.Beat(ctx)
		if err != nil && ctx.Err() == nil {
			h.cfg.Logger.Warn("Heartbeat failed", "error", err)
		}
		t.Reset(h.Next(err))
	}
}
