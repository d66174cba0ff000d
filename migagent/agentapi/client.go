package agentapi

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natsrpc"
)

// DefaultTimeout bounds a request whose context has no deadline.
const DefaultTimeout = 30 * time.Second

// Client calls agents over NATS. It is what the broker uses; it is safe for concurrent use.
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
}

// NewClient returns a client on nc. timeout bounds requests whose context has no deadline;
// 0 means DefaultTimeout.
func NewClient(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{nc: nc, timeout: timeout}
}

// Attest asks host's agent for evidence. An error answer of the agent is a *wireerr.Error
// matching its code and the code's Handler sentinel (ErrNotFound, …); no answer at all wraps
// natsrpc.ErrNoAnswer (and nats.ErrNoResponders when no agent serves host).
func (c *Client) Attest(ctx context.Context, host string, req *AttestRequest) (*attest.Evidence, error) {
	var raw json.RawMessage
	if err := c.call(ctx, host, OpAttest, req, &raw); err != nil {
		return nil, err
	}
	ev, err := attest.ParseEvidence(raw)
	if err != nil {
		return nil, fmt.Errorf("reading %s's attest reply: %w", host, err)
	}
	return ev, nil
}

// Prepare asks host's agent to make ready to receive a guest.
func (c *Client) Prepare(ctx context.Context, host string, req *PrepareRequest) (*PrepareResponse, error) {
	var resp PrepareResponse
	if err := c.call(ctx, host, OpPrepare, req, &resp); err != nil {
		return nil, err
	}
	if resp.Evidence == nil || resp.DataEndpoint == "" {
		return nil, fmt.Errorf("reading %s's prepare reply: evidence or data endpoint missing", host)
	}
	return &resp, nil
}

// Keys delivers sealed keys to host's agent.
func (c *Client) Keys(ctx context.Context, host string, req *KeysRequest) error {
	var resp KeysResponse
	if err := c.call(ctx, host, OpKeys, req, &resp); err != nil {
		return err
	}
	if !resp.OK {
		return fmt.Errorf("delivering keys to %s: agent did not acknowledge", host)
	}
	return nil
}

// Transfer starts (or re-attaches to) a transfer on the source host and returns its current
// state.
func (c *Client) Transfer(ctx context.Context, host string, req *TransferRequest) (*Progress, error) {
	var resp Progress
	if err := c.call(ctx, host, OpTransfer, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// Status returns host's view of a migration.
func (c *Client) Status(ctx context.Context, host string, req *StatusRequest) (*Status, error) {
	var resp Status
	if err := c.call(ctx, host, OpStatus, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// Erase asks the source host to erase what it keeps of a committed migration and returns its
// erasure evidence.
func (c *Client) Erase(ctx context.Context, host string, req *EraseRequest) (*attest.Evidence, error) {
	var raw json.RawMessage
	if err := c.call(ctx, host, OpErase, req, &raw); err != nil {
		return nil, err
	}
	ev, err := attest.ParseEvidence(raw)
	if err != nil {
		return nil, fmt.Errorf("reading %s's erase reply: %w", host, err)
	}
	return ev, nil
}

// Abort aborts a migration on host.
func (c *Client) Abort(ctx context.Context, host string, req *AbortRequest) (*AbortResponse, error) {
	var resp AbortResponse
	if err := c.call(ctx, host, OpAbort, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// call calls op on host, with a reply subject under ReplyPrefix(host): agents answer only
// there. An agent's error answer matches its code and the Handler sentinel of the code.
func (c *Client) call(ctx context.Context, host string, op Op, req, resp any) error {
	if err := ValidName(host); err != nil {
		return fmt.Errorf("calling agent %s: %w", op, err)
	}
	raw, err := natsrpc.Call[any, json.RawMessage](ctx, c.nc, Subject(host, op), req,
		natsrpc.WithTimeout(c.timeout), natsrpc.WithMaxResponse(MaxMessageSize), natsrpc.WithReplyPrefix(ReplyPrefix(host)))
	if err != nil {
		return withSentinel(err)
	}
	if err := json.Unmarshal(*raw, resp); err != nil {
		return fmt.Errorf("decoding %s reply of %s: %w", op, host, err)
	}
	return nil
}
