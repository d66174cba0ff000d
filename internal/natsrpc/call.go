package natsrpc

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/internal/wireerr"
)

// Defaults of the call options.
const (
	// DefaultTimeout bounds a call whose context has no deadline.
	DefaultTimeout = 30 * time.Second
	// DefaultMaxResponse bounds a response's body.
	DefaultMaxResponse = 4 << 20
)

// ErrNoAnswer is wrapped by a call's error when no answer came: none serves the subject, the
// call timed out, or the request could not be sent (the NATS error is wrapped too).
var ErrNoAnswer = errors.New("no answer")

// ErrResponseTooLarge is wrapped by a call's error when the response exceeds its limit.
var ErrResponseTooLarge = errors.New("response too large")

// CallOption tunes a call.
type CallOption func(*callOptions)

type callOptions struct {
	timeout     time.Duration
	maxResponse int
	inbox       string
}

// WithTimeout bounds a call whose context has no deadline (d > 0); the default is
// DefaultTimeout. A deadline of the context always wins.
func WithTimeout(d time.Duration) CallOption {
	return func(o *callOptions) {
		if d > 0 {
			o.timeout = d
		}
	}
}

// WithMaxResponse bounds the response's body (n > 0); the default is DefaultMaxResponse.
func WithMaxResponse(n int) CallOption {
	return func(o *callOptions) {
		if n > 0 {
			o.maxResponse = n
		}
	}
}

// WithReplyPrefix makes the call's reply subject prefix followed by a random token, instead of
// an inbox of the connection: for a server that answers only under that prefix (the agents
// answer the broker only under the part of its inbox reserved for their host). The
// connection's user must be allowed to subscribe there.
func WithReplyPrefix(prefix string) CallOption {
	return func(o *callOptions) { o.inbox = prefix }
}

// Call sends req as JSON on subject and decodes the answer into a Resp. An error answer is
// returned as a *wireerr.Error (match its code with errors.Is); a call nobody answered returns
// an error wrapping ErrNoAnswer; a response beyond the limit one wrapping ErrResponseTooLarge.
func Call[Req, Resp any](ctx context.Context, nc *nats.Conn, subject string, req Req, opts ...CallOption) (*Resp, error) {
	o := callOptions{timeout: DefaultTimeout, maxResponse: DefaultMaxResponse}
	for _, opt := range opts {
		opt(&o)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	data, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encoding request to %s: %w", subject, err)
	}
	msg, err := request(ctx, nc, subject, data, o.inbox)
	if err != nil {
		return nil, err
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return nil, wireerr.New(wireerr.Code(code), msg.Header.Get(micro.ErrorHeader))
	}
	if len(msg.Data) > o.maxResponse {
		return nil, fmt.Errorf("reading response of %s: %w: %d bytes exceeds %d", subject, ErrResponseTooLarge, len(msg.Data), o.maxResponse)
	}
	var resp Resp
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("decoding response of %s: %w", subject, err)
	}
	return &resp, nil
}

// request sends data on subject and returns the answer, on the connection's inbox or, if
// prefix is set, on a reply subject under it.
func request(ctx context.Context, nc *nats.Conn, subject string, data []byte, prefix string) (*nats.Msg, error) {
	if prefix == "" {
		msg, err := nc.RequestWithContext(ctx, subject, data)
		if err != nil {
			return nil, noAnswer(subject, err)
		}
		return msg, nil
	}
	inbox := prefix + rand.Text()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, fmt.Errorf("requesting %s: subscribing to the reply: %w", subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: data}); err != nil {
		return nil, noAnswer(subject, err)
	}
	msg, err := sub.NextMsgWithContext(ctx)
	if err != nil {
		return nil, noAnswer(subject, err)
	}
	if len(msg.Data) == 0 && msg.Header.Get("Status") == "503" {
		return nil, noAnswer(subject, nats.ErrNoResponders)
	}
	return msg, nil
}

// noAnswer wraps the error of a request that got no answer.
func noAnswer(subject string, err error) error {
	return fmt.Errorf("requesting %s: %w: %w", subject, ErrNoAnswer, err)
}
