package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsrpc"
)

// Client calls the broker API over NATS, as a tenant or as an operator. It is safe for
// concurrent use. An error answer of the broker is a *wireerr.Error matching both its code
// (CodeNotFound, …) and the code's sentinel (ErrNotFound, …) with errors.Is; no answer at all
// matches ErrUnavailable.
type Client struct {
	nc      *nats.Conn
	caller  Caller
	timeout time.Duration
}

// NewTenantClient returns a client calling the API as tenant (on the tenant's subjects; NATS
// permissions decide whether this connection may).
func NewTenantClient(nc *nats.Conn, tenant string) *Client {
	return &Client{nc: nc, caller: Caller{Tenant: tenant}, timeout: 30 * time.Second}
}

// NewOperatorClient returns a client calling the API as an operator.
func NewOperatorClient(nc *nats.Conn) *Client {
	return &Client{nc: nc, timeout: 30 * time.Second}
}

// ApplyPolicy stores a signed policy envelope.
func (c *Client) ApplyPolicy(ctx context.Context, req *ApplyPolicyRequest) (*ApplyPolicyResponse, error) {
	var resp ApplyPolicyResponse
	return &resp, c.call(ctx, OpPolicyApply, req, &resp)
}

// ListHosts lists hosts.
func (c *Client) ListHosts(ctx context.Context, req *ListHostsRequest) (*ListHostsResponse, error) {
	var resp ListHostsResponse
	return &resp, c.call(ctx, OpHostsList, req, &resp)
}

// ListGuests lists guests.
func (c *Client) ListGuests(ctx context.Context, req *ListGuestsRequest) (*ListGuestsResponse, error) {
	var resp ListGuestsResponse
	return &resp, c.call(ctx, OpGuestsList, req, &resp)
}

// AdoptGuest takes a guest in on its current host.
func (c *Client) AdoptGuest(ctx context.Context, req *AdoptGuestRequest) (*Guest, error) {
	var resp Guest
	return &resp, c.call(ctx, OpGuestsAdopt, req, &resp)
}

// ForgetGuest forgets a guest whose VM is gone (the keybroker destroys its key, on
// req.Signed; the broker drops its record), and returns the record as it was.
func (c *Client) ForgetGuest(ctx context.Context, req *ForgetGuestRequest) (*Guest, error) {
	var resp Guest
	return &resp, c.call(ctx, OpGuestsForget, req, &resp)
}

// CreateMigration requests a migration (or a dry run).
func (c *Client) CreateMigration(ctx context.Context, req *CreateMigrationRequest) (*CreateMigrationResponse, error) {
	var resp CreateMigrationResponse
	return &resp, c.call(ctx, OpMigrationsCreate, req, &resp)
}

// GetMigration returns a migration.
func (c *Client) GetMigration(ctx context.Context, id string) (*Migration, error) {
	var resp Migration
	return &resp, c.call(ctx, OpMigrationsGet, &GetMigrationRequest{ID: id}, &resp)
}

// ListMigrations returns a page of migrations; its Next, passed as the next request's After,
// reads the following page.
func (c *Client) ListMigrations(ctx context.Context, req *ListMigrationsRequest) (*ListMigrationsResponse, error) {
	var resp ListMigrationsResponse
	return &resp, c.call(ctx, OpMigrationsList, req, &resp)
}

// ListAllMigrations follows the pages of req's listing, from req.After to the last page, and
// returns the migrations of all of them, newest first.
func (c *Client) ListAllMigrations(ctx context.Context, req ListMigrationsRequest) ([]*Migration, error) {
	var all []*Migration
	for {
		resp, err := c.ListMigrations(ctx, &req)
		if err != nil {
			return nil, err
		}
		all = append(all, resp.Migrations...)
		if resp.Next == "" {
			return all, nil
		}
		req.After = resp.Next
	}
}

// AbortMigration asks to abort a migration and returns its record.
func (c *Client) AbortMigration(ctx context.Context, req *AbortMigrationRequest) (*Migration, error) {
	var resp Migration
	return &resp, c.call(ctx, OpMigrationsAbort, req, &resp)
}

// GetReceipt returns the receipt of a finished migration.
func (c *Client) GetReceipt(ctx context.Context, migrationID string) (*Receipt, error) {
	var resp Receipt
	return &resp, c.call(ctx, OpReceiptsGet, &GetReceiptRequest{MigrationID: migrationID}, &resp)
}

// ListReceipts returns a page of receipts; its Next, passed as the next request's After,
// reads the following page.
func (c *Client) ListReceipts(ctx context.Context, req *ListReceiptsRequest) (*ListReceiptsResponse, error) {
	var resp ListReceiptsResponse
	return &resp, c.call(ctx, OpReceiptsList, req, &resp)
}

func (c *Client) call(ctx context.Context, op Op, req, resp any) error {
	subject := OperatorSubject(op)
	if !c.caller.Operator() {
		subject = TenantSubject(c.caller.Tenant, op)
	}
	raw, err := natsrpc.Call[any, json.RawMessage](ctx, c.nc, subject, req, natsrpc.WithTimeout(c.timeout), natsrpc.WithMaxResponse(maxReply))
	switch {
	case errors.Is(err, natsrpc.ErrNoAnswer):
		return fmt.Errorf("calling broker %s: %w: %w", op, ErrUnavailable, err)
	case err != nil:
		return fmt.Errorf("calling broker %s: %w", op, withSentinel(err))
	}
	if err := json.Unmarshal(*raw, resp); err != nil {
		return fmt.Errorf("decoding broker %s reply: %w", op, err)
	}
	return nil
}

// CordonHost keeps new guests off a host (operators only).
func (c *Client) CordonHost(ctx context.Context, req *CordonRequest) (*HostStateRecord, error) {
	var resp HostStateRecord
	return &resp, c.call(ctx, OpHostsCordon, req, &resp)
}

// UncordonHost makes a host schedulable again (operators only).
func (c *Client) UncordonHost(ctx context.Context, req *UncordonRequest) (*HostStateRecord, error) {
	var resp HostStateRecord
	return &resp, c.call(ctx, OpHostsUncordon, req, &resp)
}

// Drain cordons a host and moves its guests off it, or plans it (operators only).
func (c *Client) Drain(ctx context.Context, req *DrainRequest) (*FleetOpResponse, error) {
	var resp FleetOpResponse
	return &resp, c.call(ctx, OpFleetDrain, req, &resp)
}

// Evacuate drains the hosts below a TCB, or plans it (operators only).
func (c *Client) Evacuate(ctx context.Context, req *EvacuateRequest) (*FleetOpResponse, error) {
	var resp FleetOpResponse
	return &resp, c.call(ctx, OpFleetEvacuate, req, &resp)
}

// Rebalance plans and runs moves that bring hosts under a committed-memory threshold
// (operators only).
func (c *Client) Rebalance(ctx context.Context, req *RebalanceRequest) (*FleetOpResponse, error) {
	var resp FleetOpResponse
	return &resp, c.call(ctx, OpFleetRebalance, req, &resp)
}

// GetFleetOp returns a fleet operation (operators only).
func (c *Client) GetFleetOp(ctx context.Context, id string) (*FleetOpView, error) {
	var resp FleetOpView
	return &resp, c.call(ctx, OpFleetGet, &GetFleetOpRequest{ID: id}, &resp)
}

// ListFleetOps lists fleet operations, newest first (operators only).
func (c *Client) ListFleetOps(ctx context.Context, req *ListFleetOpsRequest) (*ListFleetOpsResponse, error) {
	var resp ListFleetOpsResponse
	return &resp, c.call(ctx, OpFleetList, req, &resp)
}

// AbortFleetOp aborts a fleet operation (operators only).
func (c *Client) AbortFleetOp(ctx context.Context, req *AbortFleetOpRequest) (*FleetOpView, error) {
	var resp FleetOpView
	return &resp, c.call(ctx, OpFleetAbort, req, &resp)
}

// MigrationEvents returns a page of a migration's events (see MigrationEventsRequest).
func (c *Client) MigrationEvents(ctx context.Context, req *MigrationEventsRequest) (*MigrationEventsResponse, error) {
	var resp MigrationEventsResponse
	return &resp, c.call(ctx, OpMigrationsEvents, req, &resp)
}

// GetPolicy returns the policy the broker holds for a tenant or VM.
func (c *Client) GetPolicy(ctx context.Context, req *GetPolicyRequest) (*PolicyView, error) {
	var resp PolicyView
	return &resp, c.call(ctx, OpPolicyGet, req, &resp)
}

// PolicyHistory returns the revisions the broker keeps of a policy, oldest first.
func (c *Client) PolicyHistory(ctx context.Context, req *PolicyHistoryRequest) (*PolicyHistoryResponse, error) {
	var resp PolicyHistoryResponse
	return &resp, c.call(ctx, OpPolicyHistory, req, &resp)
}
