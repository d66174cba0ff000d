package agentapi

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natsrpc"
)

// Handler is an agent's implementation of the agent API. Serve calls its methods
// concurrently, up to MaxConcurrent at once (further requests are answered CodeBusy). A
// method's error chooses the wire code through ErrBadRequest, ErrNotFound and ErrConflict, and
// its text then goes to the caller (so it must hold no secret); any other error is reported as
// internal, without its text, which stays in the agent's log.
//
// Each call's context ends after RequestTimeout. Work a call starts that outlives the request
// (the destination's receiver, the transfer) must not run under it: the agent runs such work
// under its own lifetime.
type Handler interface {
	// Attest returns evidence bound to req (role source or adopt).
	Attest(ctx context.Context, req *AttestRequest) (*attest.Evidence, error)
	// Prepare scrubs and checks the receive region and returns the destination's evidence
	// with its clean-memory statement, and its data endpoint.
	Prepare(ctx context.Context, req *PrepareRequest) (*PrepareResponse, error)
	// Keys opens the sealed keys inside the agent. Delivering the same keys twice must succeed.
	Keys(ctx context.Context, req *KeysRequest) error
	// Transfer starts the transfer and returns at once with its state; the transfer itself runs
	// on after Transfer returns and reports through report. A repeated call for the same
	// migration returns the current state and starts nothing.
	Transfer(ctx context.Context, req *TransferRequest, report ProgressFunc) (*Progress, error)
	// Status returns the agent's view of a migration.
	Status(ctx context.Context, req *StatusRequest) (*Status, error)
	// Erase zeroizes the migration's keys and the epoch's memory key, scrubs the guest's
	// pages and spool, and returns evidence with role erased and the erasure statement. A
	// repeated call returns evidence for the erasure already done.
	Erase(ctx context.Context, req *EraseRequest) (*attest.Evidence, error)
	// Abort ends the migration before commit (the destination scrubs and zeroizes, the source
	// resumes the guest) and returns the erasure statement.
	Abort(ctx context.Context, req *AbortRequest) (*AbortResponse, error)
}

// ProgressFunc publishes a progress report of a transfer. It returns an error only when the
// report could not be handed to NATS.
type ProgressFunc func(Progress) error

// PublishProgress publishes p on host's progress subject for p.MigrationID.
func PublishProgress(nc *nats.Conn, host string, p Progress) error {
	data, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("encoding progress: %w", err)
	}
	if err := nc.Publish(ProgressSubject(host, p.MigrationID), data); err != nil {
		return fmt.Errorf("publishing progress: %w", err)
	}
	return nil
}

// MaxConcurrent bounds the requests an agent handles at once.
const MaxConcurrent = 32

// RequestTimeout bounds the handling of one request.
const RequestTimeout = 2 * time.Minute

// Serve serves the agent API of host on nc with h until ctx ends; then it stops taking
// requests and waits for those in progress (bounded by RequestTimeout). It returns an error if
// the service cannot be registered (for example when host is not a valid name), and nil when
// ctx ends.
func Serve(ctx context.Context, nc *nats.Conn, host string, h Handler) error {
	stop, err := Start(ctx, nc, host, h)
	if err != nil {
		return err
	}
	<-ctx.Done()
	stop()
	return nil
}

// Start is Serve that returns once the endpoints are subscribed on the server, so that a caller
// can register the host knowing that requests to it find a responder; stop ends the service
// and waits for the requests in progress.
//
// Only the broker calls agents, and it does so under ReplyPrefix(host): a request with any
// other reply subject would make the agent publish, with its own permissions, wherever the
// sender chose. Such a request is dropped unanswered and unhandled, and logged.
func Start(ctx context.Context, nc *nats.Conn, host string, h Handler) (stop func(), err error) {
	if err := ValidName(host); err != nil {
		return nil, fmt.Errorf("serving agent API: host: %w", err)
	}
	report := func(p Progress) error { return PublishProgress(nc, host, p) }
	handlers := map[Op]natsrpc.Handler{
		OpAttest:  natsrpc.Typed(h.Attest),
		OpPrepare: natsrpc.Typed(h.Prepare),
		OpKeys: natsrpc.Typed(func(ctx context.Context, r *KeysRequest) (*KeysResponse, error) {
			if err := h.Keys(ctx, r); err != nil {
				return nil, err
			}
			return &KeysResponse{OK: true}, nil
		}),
		OpTransfer: natsrpc.Typed(func(ctx context.Context, r *TransferRequest) (*Progress, error) {
			return h.Transfer(ctx, r, report)
		}),
		OpStatus: natsrpc.Typed(h.Status),
		OpErase:  natsrpc.Typed(h.Erase),
		OpAbort:  natsrpc.Typed(h.Abort),
	}
	reply := natsrpc.ReplyPrefixes(ReplyPrefix(host))
	var eps []natsrpc.Endpoint
	for _, op := range Ops {
		eps = append(eps, natsrpc.Endpoint{Name: string(op), Subject: Subject(host, op), Handler: handlers[op], Reply: reply})
	}
	srv, err := natsrpc.Start(ctx, natsrpc.Config{
		Conn: nc, Name: "lethe-agent", Description: "Lethe migration agent of host " + host,
		Metadata:  map[string]string{"host": host},
		Endpoints: eps, Public: codes.Public,
		InvalidCode: CodeBadRequest, BusyCode: CodeBusy,
		MaxConcurrent: MaxConcurrent, RequestTimeout: RequestTimeout, MaxRequest: MaxMessageSize,
		Logger: slog.Default().With("component", "agentapi", "host", host),
	})
	if err != nil {
		return nil, fmt.Errorf("serving agent API: %w", err)
	}
	return func() { _ = srv.Stop() }, nil
}
