package natsapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/keybroker"
)

// ErrNoKeybroker is returned (wrapped) by Client calls when no keybroker answered: none
// serves the subject, or the request timed out.
var ErrNoKeybroker = errors.New("no keybroker answered")

// Error is an error answered by the keybroker service. It matches, with errors.Is, the
// keybroker sentinel of its code (keybroker.ErrUnauthorized for "unauthorized", …).
type Error struct {
	// Code is keybroker.ErrorCode's code.
	Code string
	// Message is the service's description.
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("keybroker: %s: %s", e.Code, e.Message) }

// Is reports whether target is the keybroker sentinel whose wire code is e.Code.
func (e *Error) Is(target error) bool {
	if e.Code == "" || e.Code == "internal" {
		return false
	}
	return keybroker.ErrorCode(target) == e.Code
}

// Client calls the keybroker service: the operations tools and tenants need (tenant
// registration, key rotation, policy publication, receipts, the public key). The broker has its own client (broker package).
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
}

// NewClient returns a client on nc. timeout bounds calls whose context has no deadline; 0
// means 30 s.
func NewClient(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	return &Client{nc: nc, timeout: timeout}
}

// RegisterTenant registers a tenant's policy-signing key with an admin statement (signed is
// kbwire.SignAdmin's envelope of a keybroker.RegisterTenantRequest). It returns an *Error
// matching keybroker.ErrUnauthorized or keybroker.ErrInvalidRequest (among the errors of
// keybroker.Keybroker.RegisterTenant), or ErrNoKeybroker.
func (c *Client) RegisterTenant(ctx context.Context, signed []byte) (*keybroker.RegisterTenantResponse, error) {
	var resp keybroker.RegisterTenantResponse
	err := c.Call(ctx, OpTenantRegister, &TenantRegisterRequest{Signed: signed}, &resp)
	return &resp, err
}

// RotateKey replaces a tenant's policy key with a rotation statement (kbwire.SignRotation,
// signed by the current or the recovery key). It returns an *Error matching
// keybroker.ErrUnauthorized, keybroker.ErrInvalidRequest or keybroker.ErrUnknownTenant (among
// the errors of keybroker.Keybroker.RotateKey), or ErrNoKeybroker.
func (c *Client) RotateKey(ctx context.Context, signed []byte) (*keybroker.RotateKeyResponse, error) {
	var resp keybroker.RotateKeyResponse
	err := c.Call(ctx, OpTenantRotateKey, &keybroker.RotateKeyRequest{Signed: signed}, &resp)
	return &resp, err
}

// PublishPolicy publishes a signed policy envelope, raising the floor of its (tenant, name). It
// returns an *Error matching keybroker.ErrPolicyRejected (a bad signature or a rollback),
// keybroker.ErrUnknownTenant or keybroker.ErrInvalidRequest, or ErrNoKeybroker.
func (c *Client) PublishPolicy(ctx context.Context, envelope []byte) (*keybroker.PublishPolicyResponse, error) {
	var resp keybroker.PublishPolicyResponse
	err := c.Call(ctx, OpPolicyPublish, &keybroker.PublishPolicyRequest{Policy: envelope}, &resp)
	return &resp, err
}

// Receipt fetches a migration's signed receipt; with wait, the service waits a while for a
// pending destruction. It returns an *Error matching keybroker.ErrUnknownMigration or
// keybroker.ErrDestructionPending, or ErrNoKeybroker.
func (c *Client) Receipt(ctx context.Context, migrationID string, wait bool) (*keybroker.ReceiptResponse, error) {
	var resp keybroker.ReceiptResponse
	err := c.Call(ctx, OpReceipt, &keybroker.ReceiptRequest{MigrationID: migrationID, Wait: wait}, &resp)
	return &resp, err
}

// PublicKeyPEM fetches the receipt-signing public key, PEM. It returns an *Error (code
// "unavailable" when the keybroker cannot reach Vault) or ErrNoKeybroker.
func (c *Client) PublicKeyPEM(ctx context.Context) ([]byte, error) {
	var resp keybroker.PublicKeyResponse
	if err := c.Call(ctx, OpPublicKey, struct{}{}, &resp); err != nil {
		return nil, err
	}
	return []byte(resp.PEM), nil
}

// Call sends req as JSON to op's subject and decodes the reply into resp. It returns an
// *Error for an error reply, ErrNoKeybroker when none answered, or a decoding error.
func (c *Client) Call(ctx context.Context, op string, req, resp any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding %s request: %w", op, err)
	}
	msg, err := c.nc.RequestWithContext(ctx, Subject(op), data)
	if err != nil {
		return fmt.Errorf("calling keybroker %s: %w: %w", op, ErrNoKeybroker, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return &Error{Code: code, Message: msg.Header.Get(micro.ErrorHeader)}
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("decoding keybroker %s reply: %w", op, err)
	}
	return nil
}
