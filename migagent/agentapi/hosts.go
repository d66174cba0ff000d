package agentapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
)

// PutHost writes rec into the lethe-hosts bucket under rec.Host and waits for JetStream's
// acknowledgement. It publishes directly on the bucket's subject for the host, so the agent's
// NATS user needs no JetStream API permission beyond that one subject.
func PutHost(ctx context.Context, nc *nats.Conn, rec *HostRecord) error {
	if err := ValidName(rec.Host); err != nil {
		return fmt.Errorf("putting host record: %w", err)
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encoding host record: %w", err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	msg, err := nc.RequestWithContext(ctx, HostKVSubject(rec.Host), data)
	if err != nil {
		return fmt.Errorf("putting host record of %s: %w", rec.Host, err)
	}
	var ack struct {
		Stream string `json:"stream"`
		Seq    uint64 `json:"seq"`
		Error  *struct {
			Code        int    `json:"code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &ack); err != nil {
		return fmt.Errorf("decoding host record acknowledgement: %w", err)
	}
	if ack.Error != nil {
		return fmt.Errorf("putting host record of %s: jetstream error %d: %s", rec.Host, ack.Error.Code, ack.Error.Description)
	}
	if ack.Seq == 0 {
		return errors.New("putting host record: no acknowledgement")
	}
	return nil
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
