package natsapi

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
)

// ErrNoKeybroker is returned (wrapped) by Client calls when no keybroker answered: none
// serves the subject, or the request timed out. It is kbclient.ErrNoKeybroker.
var ErrNoKeybroker = kbclient.ErrNoKeybroker

// Error is an error answered by the keybroker service. It matches, with errors.Is, the
// keybroker sentinel of its code (keybroker.ErrUnauthorized for "unauthorized", …).
type Error struct {
	// Code is keybroker.ErrorCode's code.
	Code string
	// Message is the service's description.
	Message string
}

func (e *Error) Error() string { return (&kbclient.Error{Code: e.Code, Message: e.Message}).Error() }

// Is reports whether target is the keybroker sentinel whose wire code is e.Code.
func (e *Error) Is(target error) bool {
	if e.Code == "" || e.Code == "internal" {
		return false
	}
	return keybroker.ErrorCode(target) == e.Code
}

// Client calls the keybroker service: the operations tools and tenants need (tenant
// registration, key rotation, policy publication, receipts, the public key). It is
// kbclient.Client with errors that match the keybroker's sentinels; a tool that must not link
// the keybroker's core uses kbclient directly. The broker has its own client (broker package).
type Client struct {
	c *kbclient.Client
}

// NewClient returns a client on nc. timeout bounds calls whose context has no deadline; 0
// means 30 s.
func NewClient(nc *nats.Conn, timeout time.Duration) *Client {
	return &Client{c: kbclient.New(nc, timeout)}
}

// RegisterTenant registers a tenant's policy-signing key with an admin statement (signed is
// kbwire.SignAdmin's envelope of a keybroker.RegisterTenantRequest). It returns an *Error
// matching keybroker.ErrUnauthorized or keybroker.ErrInvalidRequest (among the errors of
// keybroker.Keybroker.RegisterTenant), or ErrNoKeybroker.
func (c *Client) RegisterTenant(ctx context.Context, signed []byte) (*keybroker.RegisterTenantResponse, error) {
	resp, err := c.c.RegisterTenant(ctx, signed)
	return resp, wireError(err)
}

// RotateKey replaces a tenant's policy key with a rotation statement (kbwire.SignRotation,
// signed by the current or the recovery key). It returns an *Error matching
// keybroker.ErrUnauthorized, keybroker.ErrInvalidRequest or keybroker.ErrUnknownTenant (among
// the errors of keybroker.Keybroker.RotateKey), or ErrNoKeybroker.
func (c *Client) RotateKey(ctx context.Context, signed []byte) (*keybroker.RotateKeyResponse, error) {
	resp, err := c.c.RotateKey(ctx, signed)
	return resp, wireError(err)
}

// PublishPolicy publishes a signed policy envelope, raising the floor of its (tenant, name). It
// returns an *Error matching keybroker.ErrPolicyRejected (a bad signature or a rollback),
// keybroker.ErrUnknownTenant or keybroker.ErrInvalidRequest, or ErrNoKeybroker.
func (c *Client) PublishPolicy(ctx context.Context, envelope []byte) (*keybroker.PublishPolicyResponse, error) {
	resp, err := c.c.PublishPolicy(ctx, envelope)
	return resp, wireError(err)
}

// Receipt fetches a migration's signed receipt; with wait, the service waits a while for a
// pending destruction. It returns an *Error matching keybroker.ErrUnknownMigration or
// keybroker.ErrDestructionPending, or ErrNoKeybroker.
func (c *Client) Receipt(ctx context.Context, migrationID string, wait bool) (*keybroker.ReceiptResponse, error) {
	resp, err := c.c.Receipt(ctx, migrationID, wait)
	return resp, wireError(err)
}

// PublicKeyPEM fetches the receipt-signing public key, PEM. It returns an *Error (code
// "unavailable" when the keybroker cannot reach Vault) or ErrNoKeybroker.
func (c *Client) PublicKeyPEM(ctx context.Context) ([]byte, error) {
	pem, err := c.c.PublicKeyPEM(ctx)
	return pem, wireError(err)
}

// Call sends req as JSON to op's subject and decodes the reply into resp. It returns an
// *Error for an error reply, ErrNoKeybroker when none answered, or a decoding error.
func (c *Client) Call(ctx context.Context, op string, req, resp any) error {
	return wireError(c.c.Call(ctx, op, req, resp))
}

// wireError turns kbclient's error answer into an *Error that matches the sentinels.
func wireError(err error) error {
	if e, ok := errors.AsType[*kbclient.Error](err); ok {
		return &Error{Code: e.Code, Message: e.Message}
	}
	return err
}
