// Package kbclient is a client of the keybroker's NATS API for tools and tenants (lethectl):
// tenant registration, key rotation, policy publication, receipts and the receipt-signing
// public key. It speaks the wire contract of package kbwire and links neither the keybroker's
// core nor its Vault client, so that a tool can call the keybroker without carrying server
// code. Package natsapi builds its client on this one and adds the matching of error answers
// with the keybroker's sentinels.
//
// It holds no secret: what it sends is signed by the caller (kbwire.SignAdmin,
// kbwire.SignRotation, a signed policy envelope), and it logs nothing.
package kbclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// ErrNoKeybroker is returned (wrapped) by Client calls when no keybroker answered: none
// serves the subject, or the request timed out.
var ErrNoKeybroker = errors.New("no keybroker answered")

// Error is an error answered by the keybroker service.
type Error struct {
	// Code is the wire code of the error (keybroker.ErrorCode's: "unauthorized",
	// "policy_rejected", "unknown_tenant", …).
	Code string
	// Message is the service's description.
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("keybroker: %s: %s", e.Code, e.Message) }

// Client calls the keybroker service. The broker has its own client (package broker).
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
}

// New returns a client on nc. timeout bounds calls whose context has no deadline; 0 means
// 30 s. The connection's user needs the permission to publish on the operation's subject and
// the inbox prefix of its role (natsauth.InboxPrefix), under which the keybroker answers.
func New(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	return &Client{nc: nc, timeout: timeout}
}

// RegisterTenant registers a tenant's policy-signing key with an admin statement (signed is
// kbwire.SignAdmin's envelope of a kbwire.RegisterTenantRequest). It returns an *Error (codes
// "unauthorized", "invalid_request") or ErrNoKeybroker.
func (c *Client) RegisterTenant(ctx context.Context, signed []byte) (*kbwire.RegisterTenantResponse, error) {
	var resp kbwire.RegisterTenantResponse
	err := c.Call(ctx, kbwire.OpTenantRegister, &kbwire.AdminRequest{Signed: signed}, &resp)
	return &resp, err
}

// RotateKey replaces a tenant's policy key with a rotation statement (kbwire.SignRotation,
// signed by the current or the recovery key). It returns an *Error (codes "unauthorized",
// "invalid_request", "unknown_tenant") or ErrNoKeybroker.
func (c *Client) RotateKey(ctx context.Context, signed []byte) (*kbwire.RotateKeyResponse, error) {
	var resp kbwire.RotateKeyResponse
	err := c.Call(ctx, kbwire.OpTenantRotateKey, &kbwire.RotateKeyRequest{Signed: signed}, &resp)
	return &resp, err
}

// PublishPolicy publishes a signed policy envelope, raising the floor of its (tenant, name). It
// returns an *Error (codes "policy_rejected" for a bad signature or a rollback,
// "unknown_tenant", "invalid_request") or ErrNoKeybroker.
func (c *Client) PublishPolicy(ctx context.Context, envelope []byte) (*kbwire.PublishPolicyResponse, error) {
	var resp kbwire.PublishPolicyResponse
	err := c.Call(ctx, kbwire.OpPolicyPublish, &kbwire.PublishPolicyRequest{Policy: envelope}, &resp)
	return &resp, err
}

// Receipt fetches a migration's signed receipt; with wait, the service waits a while for a
// pending destruction. It returns an *Error (codes "unknown_migration",
// "destruction_pending") or ErrNoKeybroker.
func (c *Client) Receipt(ctx context.Context, migrationID string, wait bool) (*kbwire.ReceiptResponse, error) {
	var resp kbwire.ReceiptResponse
	err := c.Call(ctx, kbwire.OpReceipt, &kbwire.ReceiptRequest{MigrationID: migrationID, Wait: wait}, &resp)
	return &resp, err
}

// PublicKeyPEM fetches the receipt-signing public key, PEM. It returns an *Error (code
// "unavailable" when the keybroker cannot reach Vault) or ErrNoKeybroker.
func (c *Client) PublicKeyPEM(ctx context.Context) ([]byte, error) {
	var resp kbwire.PublicKeyResponse
	if err := c.Call(ctx, kbwire.OpPublicKey, struct{}{}, &resp); err != nil {
		return nil, err
	}
	return []byte(resp.PEM), nil
}

// Call sends req as JSON to op's subject (kbwire.SubjectPrefix + "." + op) and decodes the
// reply into resp. It returns an *Error for an error reply, ErrNoKeybroker when none
// answered, or a decoding error.
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
	msg, err := c.nc.RequestWithContext(ctx, kbwire.SubjectPrefix+"."+op, data)
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
