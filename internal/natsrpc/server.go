package natsrpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/internal/wireerr"
)

// Defaults of Config.
const (
	DefaultMaxConcurrent  = 64
	DefaultRequestTimeout = 30 * time.Second
	DefaultMaxRequest     = 1 << 20
	// DefaultInvalidCode is the code of a request that does not decode or is too large.
	DefaultInvalidCode wireerr.Code = "invalid_request"
	// DefaultBusyCode is the code of a request refused at the concurrency limit or while the
	// server stops.
	DefaultBusyCode wireerr.Code = "busy"
)

// maxMessage bounds the message of an error answer.
const maxMessage = 2048

// ErrInvalidRequest is wrapped by the errors of a request that does not decode (Typed) or is
// too large; the server answers it with Config.InvalidCode and the error's text.
var ErrInvalidRequest = errors.New("invalid request")

// Request is one request as a handler sees it.
type Request struct {
	// Subject is the subject the request was sent on.
	Subject string
	// Reply is its reply subject, which the endpoint's ReplyFunc admitted: with NATS
	// permissions that confine each user's inbox, it says who will read the answer.
	Reply string
	// Data is the request's body, at most Config.MaxRequest bytes.
	Data []byte
}

// Handler handles one request; its result is answered as JSON. Its error is answered as the
// server's Public function maps it, or as an internal error.
type Handler func(ctx context.Context, r *Request) (any, error)

// Typed adapts a function of a decoded request to a Handler. An empty body decodes as the
// zero request; a body that does not decode is refused with an error wrapping
// ErrInvalidRequest.
func Typed[Req, Resp any](fn func(context.Context, *Req) (Resp, error)) Handler {
	return func(ctx context.Context, r *Request) (any, error) {
		var req Req
		if err := Decode(r.Data, &req); err != nil {
			return nil, err
		}
		return fn(ctx, &req)
	}
}

// Decode decodes a request body into v; an empty body leaves v as it is. It returns an error
// wrapping ErrInvalidRequest when the body is not v's JSON.
func Decode(data []byte, v any) error {
	if len(data) == 0 {
		return nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: decoding request: %w", ErrInvalidRequest, err)
	}
	return nil
}

// ReplyFunc reports whether a request on subject may be answered on reply.
type ReplyFunc func(subject, reply string) bool

// ReplyPrefixes returns the ReplyFunc that allows a reply subject under one of prefixes (each
// should end with a dot).
func ReplyPrefixes(prefixes ...string) ReplyFunc {
	return func(_, reply string) bool {
		for _, p := range prefixes {
			if p != "" && strings.HasPrefix(reply, p) {
				return true
			}
		}
		return false
	}
}

// Endpoint is one operation of a service.
type Endpoint struct {
	// Name names the endpoint in the service's metadata. Required.
	Name string
	// Subject is the endpoint's subject; it may hold wildcards. Required.
	Subject string
	// Handler handles its requests. Required.
	Handler Handler
	// Reply says which reply subjects requests may be answered on; any other request is
	// dropped, unanswered. Required: a server answers nowhere by default.
	Reply ReplyFunc
}

// Config configures a Server.
type Config struct {
	// Conn is the connection the service answers on. Required.
	Conn *nats.Conn
	// Name, Version and Description describe the micro service. Name is required; an empty
	// Version is "1.0.0".
	Name, Version, Description string
	// Metadata is the service's metadata. Nil: none.
	Metadata map[string]string
	// QueueGroup is every endpoint's queue group. Empty: none (each server gets every request).
	QueueGroup string
	// Endpoints are the service's operations. Required.
	Endpoints []Endpoint
	// Public maps a handler's error to the error answered to the caller, or nil for an
	// internal error (answered with a fixed message; the error is logged). Nil: an error that
	// is or wraps a *wireerr.Error is answered as that.
	Public func(error) *wireerr.Error
	// InvalidCode answers requests wrapping ErrInvalidRequest. Empty: DefaultInvalidCode.
	InvalidCode wireerr.Code
	// BusyCode answers requests refused for the concurrency limit or because the server is
	// stopping. Empty: DefaultBusyCode.
	BusyCode wireerr.Code
	// MaxConcurrent bounds the handlers running at once. Zero: DefaultMaxConcurrent.
	MaxConcurrent int
	// RequestTimeout bounds one handler's context. Zero: DefaultRequestTimeout.
	RequestTimeout time.Duration
	// DrainTimeout bounds how long Stop waits for handlers in progress. Zero: RequestTimeout.
	DrainTimeout time.Duration
	// MaxRequest bounds a request's body. Zero: DefaultMaxRequest.
	MaxRequest int
	// Logger is for operational logs. Nil: slog.Default().
	Logger *slog.Logger
	// Refused is called for every request dropped for its reply subject. Nil: none.
	Refused func(subject, reply string)
}

// Server is a running service; see Start.
type Server struct {
	cfg  Config
	base context.Context
	svc  micro.Service
	log  *slog.Logger

	stopOnce sync.Once
	stopErr  error

	mu       sync.Mutex
	closing  bool
	running  int
	inflight sync.WaitGroup
}

// Log attribute keys.
const (
	attrSubject = "subject"
	attrReply   = "reply"
	attrCode    = "code"
	attrError   = "error"
)

// Start registers the service of cfg and returns once the NATS server has its subscriptions,
// so that requests sent from then on find a responder. Handlers run with contexts derived from
// ctx's values (not its cancellation). Call Stop to end it. Start returns an error when cfg
// lacks a required field or the service cannot be registered.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.fill(); err != nil {
		return nil, fmt.Errorf("configuring service %s: %w", cfg.Name, err)
	}
	s := &Server{cfg: cfg, base: context.WithoutCancel(ctx), log: cfg.Logger}
	svc, err := micro.AddService(cfg.Conn, micro.Config{
		Name: cfg.Name, Version: cfg.Version, Description: cfg.Description, Metadata: cfg.Metadata,
		QueueGroup: cfg.QueueGroup, QueueGroupDisabled: cfg.QueueGroup == "",
	})
	if err != nil {
		return nil, fmt.Errorf("registering service %s: %w", cfg.Name, err)
	}
	s.svc = svc
	for _, ep := range cfg.Endpoints {
		opts := []micro.EndpointOpt{micro.WithEndpointSubject(ep.Subject)}
		if cfg.QueueGroup == "" {
			opts = append(opts, micro.WithEndpointQueueGroupDisabled())
		}
		if err := svc.AddEndpoint(ep.Name, micro.HandlerFunc(func(r micro.Request) { s.admit(ep, r) }), opts...); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("adding endpoint %s: %w", ep.Name, err)
		}
	}
	if err := cfg.Conn.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("subscribing endpoints of %s: %w", cfg.Name, err)
	}
	return s, nil
}

func (c *Config) fill() error {
	switch {
	case c.Conn == nil:
		return errors.New("no NATS connection")
	case c.Name == "":
		return errors.New("no service name")
	case len(c.Endpoints) == 0:
		return errors.New("no endpoints")
	}
	for _, ep := range c.Endpoints {
		if ep.Name == "" || ep.Subject == "" || ep.Handler == nil || ep.Reply == nil {
			return fmt.Errorf("endpoint %q lacks a name, subject, handler or reply rule", ep.Name)
		}
	}
	if c.Version == "" {
		c.Version = "1.0.0"
	}
	if c.Public == nil {
		c.Public = func(err error) *wireerr.Error {
			e, _ := errors.AsType[*wireerr.Error](err)
			return e
		}
	}
	if c.InvalidCode == "" {
		c.InvalidCode = DefaultInvalidCode
	}
	if c.BusyCode == "" {
		c.BusyCode = DefaultBusyCode
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = DefaultMaxConcurrent
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = c.RequestTimeout
	}
	if c.MaxRequest <= 0 {
		c.MaxRequest = DefaultMaxRequest
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Run is Start, then Stop once ctx ends. It returns Start's error, or Stop's.
func Run(ctx context.Context, cfg Config) error {
	s, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	return s.Stop()
}

// admit runs on the endpoint's subscription: it confines the reply, applies the admission
// limit and starts the handler.
func (s *Server) admit(ep Endpoint, r micro.Request) {
	if !ep.Reply(r.Subject(), r.Reply()) {
		s.log.Warn("Request refused: reply subject is not a caller's inbox", attrSubject, r.Subject(), attrReply, r.Reply())
		if s.cfg.Refused != nil {
			s.cfg.Refused(r.Subject(), r.Reply())
		}
		return
	}
	s.mu.Lock()
	if s.closing || s.running >= s.cfg.MaxConcurrent {
		closing := s.closing
		s.mu.Unlock()
		msg := "the service is at its limit of concurrent requests; try again"
		if closing {
			msg = "the service is shutting down"
		}
		s.respondError(r, wireerr.New(s.cfg.BusyCode, msg))
		return
	}
	s.running++
	s.inflight.Add(1)
	s.mu.Unlock()
	go func() {
		defer func() {
			s.mu.Lock()
			s.running--
			s.mu.Unlock()
			s.inflight.Done()
		}()
		ctx, cancel := context.WithTimeout(s.base, s.cfg.RequestTimeout)
		defer cancel()
		s.handle(ctx, ep, r)
	}()
}

// handle runs one admitted request and answers it.
func (s *Server) handle(ctx context.Context, ep Endpoint, r micro.Request) {
	var (
		resp any
		err  error
	)
	if n := len(r.Data()); n > s.cfg.MaxRequest {
		err = fmt.Errorf("%w: request of %d bytes exceeds %d", ErrInvalidRequest, n, s.cfg.MaxRequest)
	} else {
		resp, err = ep.Handler(ctx, &Request{Subject: r.Subject(), Reply: r.Reply(), Data: r.Data()})
	}
	if err != nil {
		s.respondError(r, s.public(r.Subject(), err))
		return
	}
	if err := r.RespondJSON(resp); err != nil {
		s.log.Warn("Responding failed", attrSubject, r.Subject(), attrError, err.Error())
	}
}

// public returns what the caller learns of err.
func (s *Server) public(subject string, err error) *wireerr.Error {
	if e := s.cfg.Public(err); e != nil {
		return e
	}
	if errors.Is(err, ErrInvalidRequest) {
		return wireerr.New(s.cfg.InvalidCode, err.Error())
	}
	s.log.Error("Request failed", attrSubject, subject, attrError, err.Error())
	return wireerr.New(wireerr.CodeInternal, "internal error")
}

// respondError answers r with e, its message on one line and bounded.
func (s *Server) respondError(r micro.Request, e *wireerr.Error) {
	msg := strings.Map(func(c rune) rune {
		if c == '\r' || c == '\n' {
			return ' '
		}
		return c
	}, e.Message)
	if len(msg) > maxMessage {
		msg = msg[:maxMessage] + "…"
	}
	if err := r.Error(string(e.Code), msg, nil); err != nil {
		s.log.Warn("Responding failed", attrSubject, r.Subject(), attrCode, string(e.Code), attrError, err.Error())
	}
}

// Stop stops taking requests (requests still delivered are answered busy), unsubscribes, and
// waits for the handlers in progress up to DrainTimeout. It returns an error if the service
// did not stop cleanly or handlers were still running at the bound. Calling it again returns
// the first call's result.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() { s.stopErr = s.stop() })
	return s.stopErr
}

func (s *Server) stop() error {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	err := s.svc.Stop()
	done := make(chan struct{})
	go func() {
		s.inflight.Wait()
		close(done)
	}()
	t := time.NewTimer(s.cfg.DrainTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		return fmt.Errorf("stopping service %s: handlers still running after %v", s.cfg.Name, s.cfg.DrainTimeout)
	}
	if err != nil {
		return fmt.Errorf("stopping service %s: %w", s.cfg.Name, err)
	}
	return nil
}
