package agentapi

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Handler is an agent's implementation of the agent API. Serve calls its methods
// concurrently, one goroutine per request. A method's error chooses the wire code through
// ErrBadRequest, ErrNotFound and ErrConflict; any other error is reported as internal, with its
// text (which must therefore hold no secret).
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
	// migration returns the current state and starts nothing. ctx ends when Serve ends.
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

// Serve serves the agent API of host on nc with h until ctx ends. It returns an error if the
// service cannot be registered (for example when host is not a valid name), and nil when ctx
// ends.
func Serve(ctx context.Context, nc *nats.Conn, host string, h Handler) error {
	stop, err := Start(ctx, nc, host, h)
	if err != nil {
		return err
	}
	defer stop()
	<-ctx.Done()
	return nil
}

// Start is Serve that returns once the endpoints are subscribed on the server, so that a caller
// can register the host knowing that requests to it find a responder. Handlers run with ctx;
// stop ends the service.
func Start(ctx context.Context, nc *nats.Conn, host string, h Handler) (stop func(), err error) {
	if err := ValidName(host); err != nil {
		return nil, fmt.Errorf("serving agent API: host: %w", err)
	}
	svc, err := micro.AddService(nc, micro.Config{
		Name:               "lethe-agent",
		Version:            "1.0.0",
		Description:        "Lethe migration agent of host " + host,
		Metadata:           map[string]string{"host": host},
		QueueGroupDisabled: true,
	})
	if err != nil {
		return nil, fmt.Errorf("registering agent service: %w", err)
	}
	stop = func() { _ = svc.Stop() }
	report := func(p Progress) error { return PublishProgress(nc, host, p) }
	g := svc.AddGroup(SubjectPrefix+"."+host, micro.WithGroupQueueGroupDisabled())
	endpoints := map[Op]func(context.Context, []byte) (any, error){
		OpAttest: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, h.Attest)
		},
		OpPrepare: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, h.Prepare)
		},
		OpKeys: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, func(ctx context.Context, r *KeysRequest) (*KeysResponse, error) {
				if err := h.Keys(ctx, r); err != nil {
					return nil, err
				}
				return &KeysResponse{OK: true}, nil
			})
		},
		OpTransfer: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, func(ctx context.Context, r *TransferRequest) (*Progress, error) {
				return h.Transfer(ctx, r, report)
			})
		},
		OpStatus: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, h.Status)
		},
		OpErase: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, h.Erase)
		},
		OpAbort: func(ctx context.Context, b []byte) (any, error) {
			return decodeCall(ctx, b, h.Abort)
		},
	}
	prefix := ReplyPrefix(host)
	for _, op := range Ops {
		fn := endpoints[op]
		handler := micro.HandlerFunc(func(req micro.Request) {
			// Only the broker calls agents, and it does so under ReplyPrefix(host): any other
			// reply subject would make the agent publish, with its own permissions, wherever
			// the sender chose. Such a request is dropped unanswered and unhandled.
			if !strings.HasPrefix(req.Reply(), prefix) {
				slog.Default().Warn("Request refused: reply subject is not the broker's inbox for this host",
					"component", "agentapi", "host", host, "subject", req.Subject(), "reply", req.Reply())
				return
			}
			go respond(ctx, req, fn)
		})
		if err := g.AddEndpoint(string(op), handler, micro.WithEndpointQueueGroupDisabled()); err != nil {
			stop()
			return nil, fmt.Errorf("adding agent endpoint %s: %w", op, err)
		}
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		stop()
		return nil, fmt.Errorf("subscribing agent endpoints: %w", err)
	}
	return stop, nil
}

func respond(ctx context.Context, req micro.Request, fn func(context.Context, []byte) (any, error)) {
	if len(req.Data()) > MaxMessageSize {
		_ = req.Error(CodeBadRequest, "request too large", nil)
		return
	}
	resp, err := fn(ctx, req.Data())
	if err != nil {
		msg := err.Error()
		if msg == "" {
			msg = "error"
		}
		_ = req.Error(errorCode(err), msg, nil)
		return
	}
	_ = req.RespondJSON(resp)
}

func decodeCall[Req any, Resp any](ctx context.Context, b []byte, fn func(context.Context, *Req) (Resp, error)) (any, error) {
	var r Req
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: decoding request: %w", ErrBadRequest, err)
	}
	return fn(ctx, &r)
}
