package natsapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natsrpc"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// Log attribute keys.
const (
	attrComponent = "component"
	attrOp        = "op"
	attrCode      = "code"
	attrError     = "error"
)

// MaxRequest bounds a request's size (NATS's default max_payload).
const MaxRequest = 1 << 20

// DefaultMaxConcurrent is Config.MaxConcurrent's default. A migration has at most one
// keybroker request in flight at a time (a nonce, a release, a destruction, a wait for a
// receipt), so the limit must exceed the migrations a fleet runs at once across all its
// brokers: a request refused busy is retried by its broker a check interval (a second) later,
// which turned 200 concurrent migrations into thousands of retries at the old limit of 64. A
// request waiting for Vault costs a goroutine and its decoded request (a few KiB; at most
// MaxRequest), and Vault, not this limit, sets the pace.
const DefaultMaxConcurrent = 1024

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
	// MaxConcurrent bounds the requests handled at once; further requests are answered
	// kbwire.CodeBusy. Zero: DefaultMaxConcurrent.
	MaxConcurrent int
	// RequestTimeout bounds the handling of one request, and how long the service waits for
	// requests in progress when it stops. Zero: 30 s.
	RequestTimeout time.Duration
	// MaxAwait bounds how long a receipt request with Wait waits for a pending destruction.
	// Zero: 20 s.
	MaxAwait time.Duration
}

// DefaultReplyPrefixes are the inboxes of the keybroker's callers in Lethe's NATS
// configuration: the broker's and the operators' (natsauth.InboxPrefix of each role, and a dot).
var DefaultReplyPrefixes = []string{natsauth.BrokerInboxPrefix + ".", natsauth.OperatorInboxPrefix + "."}

// TenantReplyPrefix is the inbox prefix of tenants, who call the keybroker only to publish
// their signed policies and key rotations (the signature, not the NATS user, says whose they
// are), for its public key, and for the residency log's checkpoints, consistency proofs,
// cosignatures and their own guests' histories: requests of those operations may also be
// answered there, no other.
const TenantReplyPrefix = natsauth.TenantInboxPrefix + "."

// tenantOps are the operations tenants call. The log's are public but for a guest's history,
// which a tenant is answered only about its own guests (history), and its leaves
// (log.entries), which name every tenant's guests and go to operators only.
var tenantOps = map[string]bool{
	kbwire.OpPolicyPublish: true, kbwire.OpTenantRotateKey: true, kbwire.OpPublicKey: true,
	kbwire.OpLogCheckpoint: true, kbwire.OpLogConsistency: true, kbwire.OpLogHistory: true, kbwire.OpLogCosign: true,
}

// Service is the keybroker's NATS micro service.
type Service struct {
	cfg     Config
	kb      *keybroker.Keybroker
	log     *slog.Logger
	started chan struct{}
	refused atomic.Uint64
}

// New returns a Service for cfg. It does no I/O; Run registers the service. It returns an
// error when Conn or Keybroker is missing or a reply prefix does not end with a dot.
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
		cfg.MaxConcurrent = DefaultMaxConcurrent
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

// handlers returns the service's operations.
func (s *Service) handlers() map[string]natsrpc.Handler {
	k := s.kb
	return map[string]natsrpc.Handler{
		OpNonce: natsrpc.Typed(func(ctx context.Context, r *kbwire.NonceRequest) (*kbwire.NonceResponse, error) {
			return k.IssueNonce(ctx, *r)
		}),
		OpRelease: natsrpc.Typed(k.Release),
		OpAdopt:   natsrpc.Typed(k.Adopt),
		OpReissue: natsrpc.Typed(k.Reissue),
		OpDestroy: natsrpc.Typed(k.Destroy),
		OpReceipt: natsrpc.Typed(s.receipt),
		OpPublicKey: natsrpc.Typed(func(ctx context.Context, _ *struct{}) (*kbwire.PublicKeyResponse, error) {
			pem, err := k.PublicKeyPEM(ctx)
			if err != nil {
				return nil, err
			}
			return &kbwire.PublicKeyResponse{PEM: string(pem), LogOrigin: k.LogOrigin()}, nil
		}),
		OpTenantRegister:  natsrpc.Typed(s.registerTenant),
		OpTenantRotateKey: natsrpc.Typed(k.RotateKey),
		OpGuestForget:     natsrpc.Typed(s.forget),
		OpPolicyPublish:   natsrpc.Typed(k.PublishPolicy),
		OpLogCheckpoint:   natsrpc.Typed(k.LogCheckpoint),
		OpLogConsistency:  natsrpc.Typed(k.LogConsistency),
		OpLogHistory:      s.history,
		OpLogCosign:       natsrpc.Typed(k.LogCosign),
		OpLogEntries:      natsrpc.Typed(k.LogEntries),
	}
}

// history answers a guest's history: to the broker and operators for any guest, to a tenant
// (whose inbox, _INBOX.tenant.<tenant>, NATS confines to it) for its own guests only.
func (s *Service) history(ctx context.Context, r *natsrpc.Request) (any, error) {
	var req kbwire.LogHistoryRequest
	if err := natsrpc.Decode(r.Data, &req); err != nil {
		return nil, err
	}
	if rest, ok := strings.CutPrefix(r.Reply, TenantReplyPrefix); ok {
		if tenant, _, _ := strings.Cut(rest, "."); tenant != req.Tenant {
			return nil, fmt.Errorf("the history of %s/%s is its tenant's to read: %w", req.Tenant, req.VM, keybroker.ErrUnauthorized)
		}
	}
	return s.kb.LogHistory(ctx, &req)
}

// Run registers the service and answers requests until ctx ends; then it stops taking
// requests, lets those in progress finish (bounded by RequestTimeout) and returns nil. Call it
// once. It returns an error if the service cannot be registered, or did not stop cleanly.
func (s *Service) Run(ctx context.Context) error {
	md := map[string]string{}
	if s.cfg.ID != "" {
		md["id"] = s.cfg.ID
	}
	handlers := s.handlers()
	var eps []natsrpc.Endpoint
	for _, op := range Ops {
		reply := natsrpc.ReplyPrefixes(s.cfg.ReplyPrefixes...)
		if tenantOps[op] {
			reply = natsrpc.ReplyPrefixes(append([]string{TenantReplyPrefix}, s.cfg.ReplyPrefixes...)...)
		}
		eps = append(eps, natsrpc.Endpoint{
			Name: strings.ReplaceAll(op, ".", "_"), Subject: Subject(op), Handler: handlers[op], Reply: reply,
		})
	}
	srv, err := natsrpc.Start(ctx, natsrpc.Config{
		Conn:        s.cfg.Conn,
		Name:        "lethe-keybroker",
		Description: "Lethe keybroker: attestation-gated key release, destruction and receipts",
		Metadata:    md,
		QueueGroup:  s.cfg.QueueGroup,
		Endpoints:   eps,
		Public:      s.public,
		InvalidCode: kbwire.CodeInvalidRequest, BusyCode: kbwire.CodeBusy,
		MaxConcurrent: s.cfg.MaxConcurrent, RequestTimeout: s.cfg.RequestTimeout, MaxRequest: MaxRequest,
		Logger:  s.log,
		Refused: func(string, string) { s.refused.Add(1) },
	})
	if err != nil {
		return fmt.Errorf("starting keybroker service: %w", err)
	}
	close(s.started)
	s.log.InfoContext(ctx, "Keybroker service started", "subjects", SubjectPrefix+".>", "queue_group", s.cfg.QueueGroup)
	<-ctx.Done()
	if err := srv.Stop(); err != nil {
		return err
	}
	s.log.Info("Keybroker service stopped: every request in progress finished")
	return nil
}

// RefusedReplies returns how many requests the service dropped, unhandled and unanswered,
// because their reply subject was not under one of Config.ReplyPrefixes.
func (s *Service) RefusedReplies() uint64 { return s.refused.Load() }

// public is the service's error mapping (natsrpc.Config.Public): WireError, logged.
func (s *Service) public(err error) *wireerr.Error {
	e := WireError(err)
	switch e.Code {
	case kbwire.CodeInternal:
		return nil // natsrpc logs it and answers a fixed text
	case kbwire.CodeUnavailable:
		s.log.Error("Request failed", attrCode, string(e.Code), attrError, err.Error())
	default:
		s.log.Debug("Request refused", attrCode, string(e.Code), attrError, err.Error())
	}
	return e
}

// WireError maps err to what a caller learns of it: its code (keybroker.WireCode) and a
// message. Internal and unavailable errors get a fixed message, so that no Vault address,
// Vault error text or other internal detail reaches a caller; other errors concern the request
// and keep their text (a denial lists the policy rules that failed). natsrpc puts the message
// on one line and bounds it.
func WireError(err error) *wireerr.Error {
	code := keybroker.WireCode(err)
	switch code {
	case kbwire.CodeInternal:
		return wireerr.New(code, "internal error")
	case kbwire.CodeUnavailable:
		return wireerr.New(code, "the keybroker cannot reach Vault; nothing was released")
	case kbwire.CodeDestructionPending:
		return wireerr.New(code, "Vault is unreachable; the destruction is journaled and retried, and the receipt follows it")
	}
	return wireerr.New(code, err.Error())
}

// receipt answers a receipt request, waiting up to MaxAwait for a pending destruction when
// asked to.
func (s *Service) receipt(ctx context.Context, req *kbwire.ReceiptRequest) (*kbwire.ReceiptResponse, error) {
	if !req.Wait {
		env, err := s.kb.Receipt(ctx, req.MigrationID)
		if err != nil {
			return nil, err
		}
		return &kbwire.ReceiptResponse{Receipt: env, Log: s.kb.ReceiptInclusion(ctx, env)}, nil
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
	return &kbwire.ReceiptResponse{Receipt: env, Log: s.kb.ReceiptInclusion(ctx, env)}, nil
}

// forget is guest.forget, which the broker calls with its caller's signed statement (the
// keybroker verifies and audits it). A call refused for its signature is logged too: the
// broker, who carried it, may be the one forging it.
func (s *Service) forget(ctx context.Context, req *kbwire.ForgetRequest) (*kbwire.ForgetResponse, error) {
	resp, err := s.kb.Forget(ctx, req)
	if errors.Is(err, keybroker.ErrUnauthorized) {
		s.log.WarnContext(ctx, "Forget refused", attrOp, OpGuestForget, attrError, err.Error())
	}
	return resp, err
}

// registerTenant is the admin call tenant.register (a statement signed with the admin key; the
// keybroker audits it). A refused call is logged too.
func (s *Service) registerTenant(ctx context.Context, req *kbwire.AdminRequest) (*kbwire.RegisterTenantResponse, error) {
	resp, err := s.kb.RegisterTenant(ctx, req)
	if errors.Is(err, keybroker.ErrUnauthorized) {
		s.log.WarnContext(ctx, "Admin call refused", attrOp, OpTenantRegister, attrError, err.Error())
	}
	return resp, err
}
