// Package kbclient is a client of the keybroker's NATS API for tools and tenants (lethectl):
// tenant registration, key rotation, policy publication, receipts, the receipt-signing public
// key, and the residency log's checkpoints, proofs, guest histories and witness cosignatures
// (which it fetches as they come: package tlog verifies them). It speaks the wire contract of
// package kbwire over the one request/response edge (internal/natsrpc) and links neither the keybroker's core nor its Vault client, so that a
// tool can call the keybroker without carrying server code. An error answer of the keybroker
// is a *wireerr.Error whose code, one of package kbwire's, matches with errors.Is.
//
// It holds no secret: what it sends is signed by the caller (kbwire.SignAdmin,
// kbwire.SignRotation, a signed policy envelope), and it logs nothing.
package kbclient

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsrpc"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

// ErrNoKeybroker is returned (wrapped, with natsrpc.ErrNoAnswer) by Client calls when no
// keybroker answered: none serves the subject, or the request timed out.
var ErrNoKeybroker = errors.New("no keybroker answered")

// Client calls the keybroker service: the operations tools and tenants need (tenant
// registration, key rotation, policy publication, receipts, the public key, the residency
// log). The broker has
// its own client (package broker). An error answer of the keybroker is a *wireerr.Error whose
// code, one of package kbwire's, matches with errors.Is (errors.Is(err, kbwire.CodeUnauthorized)).
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
// kbwire.SignAdmin's envelope of a kbwire.RegisterTenantRequest). It returns an error matching
// kbwire.CodeUnauthorized or kbwire.CodeInvalidRequest (among the codes of the errors of
// keybroker.Keybroker.RegisterTenant), or ErrNoKeybroker.
func (c *Client) RegisterTenant(ctx context.Context, signed []byte) (*kbwire.RegisterTenantResponse, error) {
	return call[kbwire.RegisterTenantResponse](ctx, c, kbwire.OpTenantRegister, &kbwire.AdminRequest{Signed: signed})
}

// RotateKey replaces a tenant's policy key with a rotation statement (kbwire.SignRotation,
// signed by the current or the recovery key). It returns an error matching
// kbwire.CodeUnauthorized, kbwire.CodeInvalidRequest or kbwire.CodeUnknownTenant (among the
// codes of the errors of keybroker.Keybroker.RotateKey), or ErrNoKeybroker.
func (c *Client) RotateKey(ctx context.Context, signed []byte) (*kbwire.RotateKeyResponse, error) {
	return call[kbwire.RotateKeyResponse](ctx, c, kbwire.OpTenantRotateKey, &kbwire.RotateKeyRequest{Signed: signed})
}

// Forget forgets a guest whose VM is gone for good: signed is its tenant's statement
// (kbwire.SignTenant) or an admin's (kbwire.SignAdmin) of a kbwire.ForgetGuestRequest naming
// tenant and vm, for kbwire.OpGuestForget. It returns an error matching
// kbwire.CodeUnauthorized, kbwire.CodeNotAdopted or kbwire.CodeGuestBusy (among the codes of
// the errors of keybroker.Keybroker.Forget), or ErrNoKeybroker.
func (c *Client) Forget(ctx context.Context, tenant, vm string, signed []byte) (*kbwire.ForgetResponse, error) {
	return call[kbwire.ForgetResponse](ctx, c, kbwire.OpGuestForget, &kbwire.ForgetRequest{Tenant: tenant, VM: vm, Signed: signed})
}

// PublishPolicy publishes a signed policy envelope, raising the floor of its (tenant, name). It
// returns an error matching kbwire.CodePolicyRejected (a bad signature or a rollback),
// kbwire.CodeUnknownTenant or kbwire.CodeInvalidRequest, or ErrNoKeybroker.
func (c *Client) PublishPolicy(ctx context.Context, envelope []byte) (*kbwire.PublishPolicyResponse, error) {
	return call[kbwire.PublishPolicyResponse](ctx, c, kbwire.OpPolicyPublish, &kbwire.PublishPolicyRequest{Policy: envelope})
}

// Receipt fetches a migration's signed receipt; with wait, the service waits a while for a
// pending destruction. It returns an error matching kbwire.CodeUnknownMigration or
// kbwire.CodeDestructionPending, or ErrNoKeybroker.
func (c *Client) Receipt(ctx context.Context, migrationID string, wait bool) (*kbwire.ReceiptResponse, error) {
	return call[kbwire.ReceiptResponse](ctx, c, kbwire.OpReceipt, &kbwire.ReceiptRequest{MigrationID: migrationID, Wait: wait})
}

// PublicKeyPEM fetches the receipt-signing public key, PEM. It returns an error matching
// kbwire.CodeUnavailable when the keybroker cannot reach Vault, or ErrNoKeybroker.
func (c *Client) PublicKeyPEM(ctx context.Context) ([]byte, error) {
	resp, err := call[kbwire.PublicKeyResponse](ctx, c, kbwire.OpPublicKey, struct{}{})
	if err != nil {
		return nil, err
	}
	return []byte(resp.PEM), nil
}

// PublicKey fetches the receipt-signing public key (PEM) and the residency log's origin. Over
// NATS they are only as trustworthy as NATS: compare the key's ID (receipt.KeyID) with the one
// the provider publishes elsewhere before pinning it. It returns an error matching
// kbwire.CodeUnavailable, or ErrNoKeybroker.
func (c *Client) PublicKey(ctx context.Context) (*kbwire.PublicKeyResponse, error) {
	return call[kbwire.PublicKeyResponse](ctx, c, kbwire.OpPublicKey, struct{}{})
}

// LogCheckpoint fetches a signed checkpoint of the residency log (a C2SP signed note with its
// witnesses' cosignatures): the newest, or with witnessed the newest a witness cosigned. The
// caller verifies it (tlog.Open). It returns an error matching kbwire.CodeInvalidRequest (no
// witnessed checkpoint yet) or kbwire.CodeUnavailable, or ErrNoKeybroker.
func (c *Client) LogCheckpoint(ctx context.Context, witnessed bool) ([]byte, error) {
	resp, err := call[kbwire.LogCheckpointResponse](ctx, c, kbwire.OpLogCheckpoint, &kbwire.LogCheckpointRequest{Witnessed: witnessed})
	if err != nil {
		return nil, err
	}
	return resp.Checkpoint, nil
}

// LogConsistency fetches the proof (RFC 9162) that the log of from entries is a prefix of the
// log of to entries; the caller checks it (tlog.CheckExtends). It returns an error matching
// kbwire.CodeInvalidRequest (sizes out of order or beyond the log) or kbwire.CodeUnavailable,
// or ErrNoKeybroker.
func (c *Client) LogConsistency(ctx context.Context, from, to uint64) ([][]byte, error) {
	resp, err := call[kbwire.LogConsistencyResponse](ctx, c, kbwire.OpLogConsistency, &kbwire.LogConsistencyRequest{From: from, To: to})
	if err != nil {
		return nil, err
	}
	return resp.Proof, nil
}

// LogHistory fetches a guest's entries of the residency log, each with its inclusion proof
// against the checkpoint the history carries (with witnessed, the newest a witness cosigned),
// a page at a time until the whole chain is there; the caller verifies it (tlog.Open,
// tlog.VerifyHistory). A tenant may read its own guests' only. It returns an error matching
// kbwire.CodeUnauthorized (another tenant's guest), kbwire.CodeInvalidRequest or
// kbwire.CodeUnavailable, or ErrNoKeybroker; or an error if a page is proven against another
// checkpoint than the first.
func (c *Client) LogHistory(ctx context.Context, tenant, vm string, witnessed bool) (*tlog.History, error) {
	req := &kbwire.LogHistoryRequest{Tenant: tenant, VM: vm, Witnessed: witnessed}
	h, err := call[tlog.History](ctx, c, kbwire.OpLogHistory, req)
	if err != nil || h.Next == 0 {
		return h, err
	}
	cp, err := tlog.ParseUnverified(h.Checkpoint)
	if err != nil {
		return nil, fmt.Errorf("reading the history of %s/%s: %w", tenant, vm, err)
	}
	req.Size = cp.Size
	for h.Next != 0 {
		req.FromSeq = h.Next
		page, err := call[tlog.History](ctx, c, kbwire.OpLogHistory, req)
		if err != nil {
			return nil, err
		}
		// Witnesses may have cosigned the checkpoint between two pages: the same text is the
		// same checkpoint.
		if pcp, err := tlog.ParseUnverified(page.Checkpoint); err != nil || pcp.Text() != cp.Text() {
			return nil, fmt.Errorf("reading the history of %s/%s: a page came proven against another checkpoint", tenant, vm)
		}
		if len(page.Entries) == 0 && page.Next != 0 {
			return nil, fmt.Errorf("reading the history of %s/%s: an empty page", tenant, vm)
		}
		h.Entries, h.Next = append(h.Entries, page.Entries...), page.Next
	}
	return h, nil
}

// LogEntries fetches leaves [from, to) of the residency log, a page of kbwire.MaxLogEntries
// at a time, for a monitor (tlog.Audit). Operators only: a tenant's request is not answered.
// It returns an error matching kbwire.CodeInvalidRequest (beyond the log) or
// kbwire.CodeUnavailable, or ErrNoKeybroker.
func (c *Client) LogEntries(ctx context.Context, from, to uint64) ([][]byte, error) {
	var leaves [][]byte
	for from < to {
		end := min(to, from+kbwire.MaxLogEntries)
		resp, err := call[kbwire.LogEntriesResponse](ctx, c, kbwire.OpLogEntries, &kbwire.LogEntriesRequest{From: from, To: end})
		if err != nil {
			return nil, err
		}
		if uint64(len(resp.Leaves)) != end-from {
			return nil, fmt.Errorf("fetching leaves %d to %d: %d answered", from, end, len(resp.Leaves))
		}
		leaves, from = append(leaves, resp.Leaves...), end
	}
	return leaves, nil
}

// LogCosign submits a checkpoint the log signed, cosigned by a witness (the signed note with
// the witness's cosignature line added), and returns the checkpoint with every cosignature the
// keybroker now holds for it. It returns an error matching kbwire.CodeInvalidRequest (among
// others: the keybroker knows no witness of that key, or the log signed no such checkpoint) or
// kbwire.CodeUnavailable, or ErrNoKeybroker.
func (c *Client) LogCosign(ctx context.Context, cosigned []byte) ([]byte, error) {
	resp, err := call[kbwire.LogCheckpointResponse](ctx, c, kbwire.OpLogCosign, &kbwire.LogCosignRequest{Checkpoint: cosigned})
	if err != nil {
		return nil, err
	}
	return resp.Checkpoint, nil
}

// call calls op. It returns a *wireerr.Error for an error answer, an error wrapping
// ErrNoKeybroker when none answered, or a decoding error.
func call[Resp, Req any](ctx context.Context, c *Client, op string, req Req) (*Resp, error) {
	resp, err := natsrpc.Call[Req, Resp](ctx, c.nc, kbwire.SubjectPrefix+"."+op, req, natsrpc.WithTimeout(c.timeout))
	if errors.Is(err, natsrpc.ErrNoAnswer) {
		return nil, fmt.Errorf("calling keybroker %s: %w: %w", op, ErrNoKeybroker, err)
	}
	return resp, err
}
