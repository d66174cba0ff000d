package natsapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// Log attribute keys.
const (
	attrComponent = "component"
	attrOp        = "op"
	attrCode      = "code"
	attrError     = "error"
	attrTenant    = "tenant"
	attrReply     = "reply"
)

// MaxRequest bounds a request's size (NATS's default max_payload).
const MaxRequest = 1 << 20

// maxDescription bounds the error text sent back.
const maxDescription = 2048

// Config configures a Service.
type Config struct {
	// Conn is the NATS connection the service answers on. Required. With authentication, its
	// user needs to subscribe to lethe.v1.keybroker.> and $SRV.> and to publish on its callers'
	// inboxes (ReplyPrefixes), and no more: it needs no general response permission.
	Conn *nats.Conn
	// ReplyPrefixes are the inbox prefixes of the callers, each ending with a dot: a request
	// is answered only if its reply subject starts with one of them, and dropped (logged and
	// counted) otherwise, so that no caller can make the keybroker publish, with its own
	// permissions, on a subject of the caller's choosing. Nil: DefaultReplyPrefixes.
	ReplyPrefixes []string
	// Keybroker is the core the service offers. Required.
	Keybroker *keybroker.Keybroker
	// Logger is for operational logs. Nil: slog.Default().
	Logger *slog.Logger
	// ID names this instance in the service's metadata. Empty: none.
	ID string
	// QueueGroup is the queue group of every endpoint. Empty: "lethe-keybroker".
	QueueGroup string
	// MaxConcurrent bounds the requests handled at once; further requests wait. Zero: 64.
	MaxConcurrent int
	// RequestTimeout bounds the handling of one request. Zero: 30 s.
	RequestTimeout time.Duration
	// MaxAwait bounds how long a receipt request with Wait waits for a pending destruction.
	// Zero: 20 s.
	MaxAwait time.Duration
}

// DefaultReplyPrefixes are the inboxes of the keybroker's callers in Lethe's NATS
// configuration: the broker's and the operators' (natsauth.InboxPrefix of each role, and a dot).
var DefaultReplyPrefixes = []string{natsauth.BrokerInboxPrefix + ".", natsauth.OperatorInboxPrefix + "."}

// TenantReplyPrefix is the inbox prefix of tenants, who call the keybroker only to publish
// their signed policies and key rotations: requests of those operations may also be answered
// there (the signature, not the NATS user, says whose they are), no other.
const TenantReplyPrefix = natsauth.TenantInboxPrefix + "."

// tenantOps are the operations tenants call.
var tenantOps = map[string]bool{kbwire.OpPolicyPublish: true, kbwire.OpTenantRotateKey: true}

// Service is the keybroker's NATS micro service.
type Service struct {
	cfg     Config
	kb      *keybroker.Keybroker
	log     *slog.Logger
	started chan struct{}
	refused atomic.Uint64
}

// New returns a Service for cfg. It does no I/O; Run registers the service. It returns an
// error when Conn or Keybroker is missing.
func New(cfg Config) (*Service, error) {
	if cfg.Conn == nil {
		return nil, errors.New("configuring keybroker service: no NATS connection")
	}
	if cfg.Keybroker == nil {
		return nil, errors.New("configuring keybroker service: no keybroker")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.QueueGroup == "" {
		cfg.QueueGroup = "lethe-keybroker"
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 64
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 30 * time.Second
	}
	if cfg.ReplyPrefixes == nil {
		cfg.ReplyPrefixes = DefaultReplyPrefixes
	}
	for _, p := range cfg.ReplyPrefixes {
		if !strings.HasSuffix(p, ".") || len(p) < 2 {
			return nil, fmt.Errorf("configuring keybroker service: reply prefix %q does not end with a dot", p)
		}
	}
	if cfg.MaxAwait <= 0 {
		cfg.MaxAwait = 20 * time.Second
	}
	return &Service{
		cfg: cfg, kb: cfg.Keybroker, log: cfg.Logger.With(attrComponent, "keybroker-nats"),
		started: make(chan struct{}),
	}, nil
}

// Started is closed once Run has registered every endpoint: from then on requests are
// answered.
func (s *Service) Started() <-chan struct{} { return s.started }

// handler handles one request's body.
type handler func(ctx context.Context, data []byte) (any, error)

// endpoint adapts a typed call to a handler. An empty body decodes as the zero request.
func endpoint[Req, Resp any](fn func(context.Context, *Req) (Resp, error)) handler {
	return func(ctx context.Context, data []byte) (any, error) {
		var req Req
		if len(data) > 0 {
			if err := json.Unmarshal(data, &req); err != nil {
				return nil, fmt.Errorf("decoding request: %w: %w", keybroker.ErrInvalidRequest, err)
			}
		}
		return fn(ctx, &req)
	}
}

// handlers returns the service's operations.
func (s *Service) handlers() map[string]handler {
	k := s.kb
	return map[string]handler{
		OpNonce: endpoint(func(ctx context.Context, r *keybroker.NonceRequest) (*keybroker.NonceResponse, error) {
			return k.IssueNonce(ctx, *r)
		}),
		OpRelease: endpoint(k.Release),
		OpAdopt:   endpoint(k.Adopt),
		OpReissue: endpoint(k.Reissue),
		OpDestroy: endpoint(k.Destroy),
		OpReceipt: endpoint(s.receipt),
		OpPublicKey: endpoint(func(ctx context.Context, _ *struct{}) (*keybroker.PublicKeyResponse, error) {
			pem, err := k.PublicKeyPEM(ctx)
			if err != nil {
				return nil, err
			}
			return &keybroker.PublicKeyResponse{PEM: string(pem)}, nil
		}),
		OpTenantRegister:  endpoint(s.registerTenant),
		OpTenantRotateKey: endpoint(k.RotateKey),
		OpPolicyPublish:   endpoint(k.PublishPolicy),
	}
}

// Run registers the service and answers requests until ctx ends; then it stops the service,
// lets the requests in progress finish and returns nil. Call it once. It returns an error if
// the service cannot be registered.
func (s *Service) Run(ctx context.Context) error {
	md := map[string]string{}
	if s.cfg.ID != "" {
		md["id"] = s.cfg.ID
	}
	svc, err := micro.AddService(s.cfg.Conn, micro.Config{
		Name:        "lethe-keybroker",
		Version:     "1.0.0",
		Description: "Lethe keybroker: attestation-gated key release, destruction and receipts",
		QueueGroup:  s.cfg.QueueGroup,
		Metadata:    md,
	})
	if err != nil {
		return fmt.Errorf("registering keybroker service: %w", err)
	}
	// Requests in progress finish after ctx ends (bounded by RequestTimeout): a release cut
	// off half-way would only be cleaned up again. A request is admitted (counted in
	// inflight) under mu, and none is admitted once closing is set, so that inflight.Wait
	// below waits for every request that started, including those the draining subscriptions
	// still deliver after ctx ended (which are refused).
	base := context.WithoutCancel(ctx)
	var (
		mu       sync.Mutex
		closing  bool
		inflight sync.WaitGroup
	)
	admit := func() bool {
		mu.Lock()
		defer mu.Unlock()
		if closing || ctx.Err() != nil {
			return false
		}
		inflight.Add(1)
		return true
	}
	sem := make(chan struct{}, s.cfg.MaxConcurrent)
	handlers := s.handlers()
	for _, op := range Ops {
		fn := handlers[op]
		h := micro.HandlerFunc(func(r micro.Request) {
			if !s.replyAllowed(op, r.Reply()) {
				s.refused.Add(1)
				s.log.Warn("Request refused: reply subject is not a caller's inbox", attrOp, op, attrReply, r.Reply())
				return
			}
			if !admit() {
				_ = r.Error(CodeBusy, "the keybroker is shutting down", nil)
				return
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				inflight.Done()
				_ = r.Error(CodeBusy, "the keybroker is shutting down", nil)
				return
			}
			go func() {
				defer inflight.Done()
				defer func() { <-sem }()
				rctx, cancel := context.WithTimeout(base, s.cfg.RequestTimeout)
				defer cancel()
				s.handle(rctx, op, r, fn)
			}()
		})
		name := strings.ReplaceAll(op, ".", "_")
		if err := svc.AddEndpoint(name, h, micro.WithEndpointSubject(Subject(op))); err != nil {
			_ = svc.Stop()
			return fmt.Errorf("adding endpoint %s: %w", op, err)
		}
	}
	// Started promises that requests find a responder: the server must have the subscriptions.
	if err := s.cfg.Conn.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return fmt.Errorf("subscribing keybroker endpoints: %w", err)
	}
	close(s.started)
	s.log.InfoContext(ctx, "Keybroker service started", "subjects", SubjectPrefix+".>", "queue_group", s.cfg.QueueGroup)
	<-ctx.Done()
	mu.Lock()
	closing = true
	mu.Unlock()
	err = svc.Stop()
	inflight.Wait()
	s.log.Info("Keybroker service stopped: every request in progress finished")
	if err != nil {
		return fmt.Errorf("stopping keybroker service: %w", err)
	}
	return nil
}

// RefusedReplies returns how many requests the service dropped, unhandled and unanswered,
// because their reply subject was not under one of Config.ReplyPrefixes.
func (s *Service) RefusedReplies() uint64 { return s.refused.Load() }

// replyAllowed reports whether reply is under one of the inbox prefixes of op's callers.
func (s *Service) replyAllowed(op, reply string) bool {
	if tenantOps[op] && strings.HasPrefix(reply, TenantReplyPrefix) {
		return true
	}
	for _, p := range s.cfg.ReplyPrefixes {
		if strings.HasPrefix(reply, p) {
			return true
		}
	}
	return false
}

// handle runs one request and answers it.
func (s *Service) handle(ctx context.Context, op string, r micro.Request, fn handler) {
	if len(r.Data()) > MaxRequest {
		s.respondError(op, r, fmt.Errorf("request of %d bytes exceeds %d: %w", len(r.Data()), MaxRequest, keybroker.ErrInvalidRequest))
		return
	}
	resp, err := fn(ctx, r.Data())
	if err != nil {
		s.respondError(op, r, err)
		return
	}
	if err := r.RespondJSON(resp); err != nil {
		s.log.WarnContext(ctx, "Responding failed", attrOp, op, attrError, err.Error())
	}
}

// respondError answers r with err's wire code and description.
func (s *Service) respondError(op string, r micro.Request, err error) {
	code, desc := WireError(err)
	switch code {
	case "internal", "unavailable":
		s.log.Error("Request failed", attrOp, op, attrCode, code, attrError, err.Error())
	default:
		s.log.Debug("Request refused", attrOp, op, attrCode, code, attrError, err.Error())
	}
	if rerr := r.Error(code, desc, nil); rerr != nil {
		s.log.Warn("Responding failed", attrOp, op, attrError, rerr.Error())
	}
}

// WireError maps err to its wire code (keybroker.ErrorCode) and the description sent with it.
// Internal and unavailable errors get a fixed description, so that no Vault address, Vault
// error text or other internal detail reaches a caller; other errors concern the request and
// keep their text (a denial lists the policy rules that failed), on one line and bounded.
func WireError(err error) (code, description string) {
	code = keybroker.ErrorCode(err)
	switch code {
	case "internal":
		return code, "internal error"
	case "unavailable":
		return code, "the keybroker cannot reach Vault; nothing was released"
	case "destruction_pending":
		return code, "Vault is unreachable; the destruction is journaled and retried, and the receipt follows it"
	}
	desc := strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return ' '
		}
		return r
	}, err.Error())
	if len(desc) > maxDescription {
		desc = desc[:maxDescription] + "…"
	}
	return code, desc
}

// receipt answers a receipt request, waiting up to MaxAwait for a pending destruction when
// asked to.
func (s *Service) receipt(ctx context.Context, req *keybroker.ReceiptRequest) (*keybroker.ReceiptResponse, error) {
	if !req.Wait {
		env, err := s.kb.Receipt(ctx, req.MigrationID)
		if err != nil {
			return nil, err
		}
		return &keybroker.ReceiptResponse{Receipt: env}, nil
	}
	wctx, cancel := context.WithTimeout(ctx, s.cfg.MaxAwait)
	defer cancel()
	env, err := s.kb.AwaitReceipt(wctx, req.MigrationID)
	if err != nil {
		if wctx.Err() != nil && ctx.Err() == nil {
			return nil, fmt.Errorf("receipt of migration %s after %v: %w", req.MigrationID, s.cfg.MaxAwait, keybroker.ErrDestructionPending)
		}
		return nil, err
	}
	return &keybroker.ReceiptResponse{Receipt: env}, nil
}

// registerTenant is the admin call tenant.register (a statement signed with the admin key; the
// keybroker audits it). A refused call is logged too.
func (s *Service) registerTenant(ctx context.Context, req *TenantRegisterRequest) (*keybroker.RegisterTenantResponse, error) {
	resp, err := s.kb.RegisterTenant(ctx, req)
	if errors.Is(err, keybroker.ErrUnauthorized) {
		s.log.WarnContext(ctx, "Admin call refused", attrOp, OpTenantRegister, attrError, err.Error())
	}
	return resp, err
}
