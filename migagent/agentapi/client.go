package agentapi

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
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

// Attest asks host's agent for evidence. Errors from the agent are *Error.
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

func (c *Client) call(ctx context.Context, host string, op Op, req, resp any) error {
	if err := ValidName(host); err != nil {
		return fmt.Errorf("calling agent %s: %w", op, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	return requestAs(ctx, c.nc, Subject(host, op), ReplyPrefix(host)+rand.Text(), req, resp)
}

// requestAs sends req as JSON to subject with the reply subject inbox (which the connection's
// user must be allowed to subscribe to) and decodes the reply into resp: agents answer only
// under ReplyPrefix of their own host. A reply carrying NATS micro error headers becomes an
// *Error.
func requestAs(ctx context.Context, nc *nats.Conn, subject, inbox string, req, resp any) error {
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding %s request: %w", subject, err)
	}
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return fmt.Errorf("requesting %s: %w", subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: data}); err != nil {
		return fmt.Errorf("requesting %s: %w", subject, err)
	}
	msg, err := sub.NextMsgWithContext(ctx)
	if err != nil {
		return fmt.Errorf("requesting %s: %w", subject, err)
	}
	if len(msg.Data) == 0 && msg.Header.Get("Status") == "503" {
		return fmt.Errorf("requesting %s: %w", subject, nats.ErrNoResponders)
	}
	return decodeReply(subject, msg, resp)
}

// decodeReply decodes msg, the reply to a request on subject, into resp.
func decodeReply(subject string, msg *nats.Msg, resp any) error {
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return &Error{Code: code, Message: msg.Header.Get(micro.ErrorHeader)}
	}
	if len(msg.Data) > MaxMessageSize {
		return fmt.Errorf("reading %s reply: %d bytes exceeds the limit", subject, len(msg.Data))
	}
	if resp == nil {
		return nil
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("decoding %s reply: %w", subject, err)
	}
	return nil
}
