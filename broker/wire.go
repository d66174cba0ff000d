package broker

import (
	"fmt"
	"strings"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// SubjectPrefix is the prefix of the broker API's subjects.
const SubjectPrefix = natsauth.BrokerSubjectPrefix

// EventsSubjectPrefix is the prefix of the events subjects, lethe.v1.events.<migration-id>.
const EventsSubjectPrefix = natsauth.EventsSubjectPrefix

// EventsSubject returns the events subject of a migration.
func EventsSubject(migrationID string) string { return EventsSubjectPrefix + "." + migrationID }

// Op is an operation of the broker API.
type Op string

// The operations of the broker API.
const (
	OpPolicyApply      Op = "policy.apply"
	OpHostsList        Op = "hosts.list"
	OpGuestsList       Op = "guests.list"
	OpGuestsAdopt      Op = "guests.adopt"
	OpGuestsForget     Op = "guests.forget"
	OpMigrationsCreate Op = "migrations.create"
	OpMigrationsGet    Op = "migrations.get"
	OpMigrationsList   Op = "migrations.list"
	OpMigrationsAbort  Op = "migrations.abort"
	OpReceiptsGet      Op = "receipts.get"
	OpReceiptsList     Op = "receipts.list"
	OpMigrationsEvents Op = "migrations.events"
	OpPolicyGet        Op = "policy.get"
	OpPolicyHistory    Op = "policy.history"
)

// Ops lists every operation of the broker API.
var Ops = []Op{OpPolicyApply, OpHostsList, OpGuestsList, OpGuestsAdopt, OpGuestsForget, OpMigrationsCreate,
	OpMigrationsGet, OpMigrationsList, OpMigrationsAbort, OpReceiptsGet, OpReceiptsList,
	OpMigrationsEvents, OpPolicyGet, OpPolicyHistory}

// TenantSubject returns the subject of op for tenant.
func TenantSubject(tenant string, op Op) string {
	return SubjectPrefix + ".tenant." + tenant + "." + string(op)
}

// OperatorSubject returns the subject of op for operators.
func OperatorSubject(op Op) string { return SubjectPrefix + ".operator." + string(op) }

// Caller is who called the broker API, as its subject says.
type Caller struct {
	// Tenant is the calling tenant; empty for an operator.
	Tenant string
}

// inbox returns the role and name whose inbox the caller's replies go to.
func (c Caller) inbox() (natsauth.Role, string) {
	if c.Operator() {
		return natsauth.RoleOperator, ""
	}
	return natsauth.RoleTenant, c.Tenant
}

// Operator reports whether the caller is an operator.
func (c Caller) Operator() bool { return c.Tenant == "" }

func (c Caller) String() string {
	if c.Operator() {
		return "operator"
	}
	return "tenant:" + c.Tenant
}

// parseCaller returns the caller of a request on subject for op.
func parseCaller(subject string, op Op) (Caller, error) {
	rest, ok := strings.CutSuffix(subject, "."+string(op))
	if !ok {
		return Caller{}, fmt.Errorf("%w: subject %q is not for %s", ErrInvalid, subject, op)
	}
	if rest == SubjectPrefix+".operator" {
		return Caller{}, nil
	}
	tenant, ok := strings.CutPrefix(rest, SubjectPrefix+".tenant.")
	if !ok {
		return Caller{}, fmt.Errorf("%w: subject %q names no caller", ErrInvalid, subject)
	}
	if err := agentapi.ValidName(tenant); err != nil {
		return Caller{}, fmt.Errorf("%w: tenant: %w", ErrInvalid, err)
	}
	return Caller{Tenant: tenant}, nil
}

// tenantFor returns the tenant a request acts for: a tenant's own name (a request naming
// another tenant is refused), or for an operator the tenant the request names.
func (c Caller) tenantFor(requested string) (string, error) {
	if !c.Operator() {
		if requested != "" && requested != c.Tenant {
			return "", fmt.Errorf("%w: tenant %q may not act for tenant %q", ErrNotFound, c.Tenant, requested)
		}
		return c.Tenant, nil
	}
	if err := agentapi.ValidName(requested); err != nil {
		return "", fmt.Errorf("%w: tenant: %w", ErrInvalid, err)
	}
	return requested, nil
}

// listScope is the tenant a listing of requested covers: the caller's own for a tenant, and
// for an operator requested, or "" (every tenant) when requested is empty.
func (c Caller) listScope(requested string) (string, error) {
	if c.Operator() && requested == "" {
		return "", nil
	}
	return c.tenantFor(requested)
}

// sees reports whether the caller may see something of tenant.
func (c Caller) sees(tenant string) bool { return c.Operator() || c.Tenant == tenant }

// ApplyPolicyRequest stores a tenant's signed policy envelope.
type ApplyPolicyRequest struct {
	// Tenant: operators only; a tenant applies its own.
	Tenant string `json:"tenant,omitempty"`
	// VM scopes the policy to one VM; empty means tenant-wide.
	VM string `json:"vm,omitempty"`
	// Envelope is the signed policy, verbatim.
	Envelope []byte `json:"envelope"`
}

// ApplyPolicyResponse says where the policy was stored.
type ApplyPolicyResponse struct {
	Key      string `json:"key"`
	Revision uint64 `json:"revision"`
}

// ListHostsRequest lists hosts.
type ListHostsRequest struct {
	// All includes hosts whose heartbeat is stale.
	All bool `json:"all,omitempty"`
}

// HostView is a host as the API shows it. Tenants see only their own guests.
type HostView struct {
	agentapi.HostRecord
	// Live reports whether the host's heartbeat is fresh.
	Live bool `json:"live"`
	// State is the operator's word on the host (schedulable when nothing was said); the
	// rest of StateRecord says who said it, why and when.
	State       HostState        `json:"state"`
	StateRecord *HostStateRecord `json:"stateRecord,omitempty"`
	// CommittedBytes is the memory of the guests the host runs; ArrivingBytes that of the
	// guests migrating to it. Incoming and Outgoing count its migrations in flight.
	CommittedBytes uint64 `json:"committedBytes"`
	ArrivingBytes  uint64 `json:"arrivingBytes,omitempty"`
	Incoming       int    `json:"incoming,omitempty"`
	Outgoing       int    `json:"outgoing,omitempty"`
}

// ListHostsResponse lists hosts, sorted by name.
type ListHostsResponse struct {
	Hosts []HostView `json:"hosts"`
}

// ListGuestsRequest lists guests.
type ListGuestsRequest struct {
	// Tenant filters by tenant (operators); tenants see their own.
	Tenant string `json:"tenant,omitempty"`
}

// ListGuestsResponse lists guests, sorted by tenant and VM.
type ListGuestsResponse struct {
	Guests []Guest `json:"guests"`
}

// AdoptGuestRequest takes a guest in: its first residency (epoch 1) on Host.
type AdoptGuestRequest struct {
	Tenant string `json:"tenant,omitempty"`
	VM     string `json:"vm"`
	Host   string `json:"host"`
}

// ForgetGuestRequest forgets a guest whose VM is gone for good: the keybroker destroys its key
// and the broker drops its record (see guests.forget in the package documentation).
type ForgetGuestRequest struct {
	// Tenant: operators only; a tenant forgets its own guests.
	Tenant string `json:"tenant,omitempty"`
	VM     string `json:"vm"`
	// Reason is why, recorded in the audit record.
	Reason string `json:"reason,omitempty"`
	// Signed is the statement that asks the keybroker for the forget, which the broker passes
	// on and cannot forge: kbwire.SignTenant's (the tenant's policy key) or kbwire.SignAdmin's
	// (the operator's admin key) envelope of a kbwire.ForgetGuestRequest naming the guest, for
	// kbwire.OpGuestForget (lethectl guests forget signs it).
	Signed []byte `json:"signed"`
}

// CreateMigrationRequest asks for a migration of a guest.
type CreateMigrationRequest struct {
	Tenant string `json:"tenant,omitempty"`
	VM     string `json:"vm"`
	// Destination is the host to move to; empty lets the broker choose one that passes the
	// pre-filter.
	Destination string `json:"destination,omitempty"`
	// DryRun reports which hosts would pass the pre-filter, and why others would not, and
	// starts nothing.
	DryRun bool `json:"dryRun,omitempty"`

	// place narrows placement for a fleet operation's migrations, and operation names it;
	// never set from the wire.
	place     placeOpts
	operation string
	// id is the migration's id, chosen ahead by a fleet operation; empty: a new one. ahead,
	// if set, is called once a destination is chosen and before the migration is recorded;
	// its error ends the request.
	id    string
	ahead func() error
}

// CreateMigrationResponse is the new migration, or the verdicts of a dry run.
type CreateMigrationResponse struct {
	Migration *Migration `json:"migration,omitempty"`
	DryRun    *DryRun    `json:"dryRun,omitempty"`
}

// DryRun is the pre-filter's verdict on every live host for a guest.
type DryRun struct {
	Tenant   string          `json:"tenant"`
	VM       string          `json:"vm"`
	Source   string          `json:"source"`
	Platform attest.Platform `json:"platform"`
	// PolicyKey is the policy the pre-filter read.
	PolicyKey string        `json:"policyKey"`
	Hosts     []HostVerdict `json:"hosts"`
	// Order is the passing hosts in the order placement would try them (Config.Fleet's
	// PlacementOrder): the first is where the guest would go.
	Order []string `json:"order,omitempty"`
	// Notes says what the pre-filter could not check.
	Notes []string `json:"notes,omitempty"`
}

// HostVerdict is the pre-filter's verdict on one host.
type HostVerdict struct {
	Host string `json:"host"`
	Pass bool   `json:"pass"`
	// Reasons says why a host would not pass (empty when it would).
	Reasons []string `json:"reasons,omitempty"`
}

// GetMigrationRequest names a migration.
type GetMigrationRequest struct {
	ID string `json:"id"`
}

// ListMigrationsRequest asks for a page of migrations, newest first (by creation time, then
// by id). The filters combine: a migration is listed if it passes all of them.
type ListMigrationsRequest struct {
	// Tenant filters by tenant (operators); tenants see their own.
	Tenant string `json:"tenant,omitempty"`
	// VM filters by guest name.
	VM string `json:"vm,omitempty"`
	// State filters by state: ListActive (not finished), ListEnded (finished), or empty for
	// both.
	State string `json:"state,omitempty"`
	// Active is State ListActive, kept for older clients.
	Active bool `json:"active,omitempty"`
	// Archived also lists the ended migrations moved to the archive (Config.EndedGrace). Such
	// a listing reads the whole archive, so it costs in proportion to the history kept.
	Archived bool `json:"archived,omitempty"`
	// Limit is the most migrations a page holds. Zero means DefaultListLimit; more than
	// MaxListLimit is refused. A page also stops short of MaxListBytes of records, so that
	// it always fits NATS's payload limit.
	Limit int `json:"limit,omitempty"`
	// After is the Next of the previous page; empty starts at the newest migration.
	After string `json:"after,omitempty"`
}

// States a migrations listing filters by (ListMigrationsRequest.State).
const (
	ListActive = "active"
	ListEnded  = "ended"
)

// Bounds of a page of migrations.list.
const (
	// DefaultListLimit is the size of a page whose request names no limit.
	DefaultListLimit = 100
	// MaxListLimit is the largest limit a request may name.
	MaxListLimit = 500
	// MaxListBytes bounds the encoded records of one page: half of NATS's default 1 MiB
	// maximum payload, so the page fits with room for the reply's envelope.
	MaxListBytes = 512 << 10
)

// ListMigrationsResponse is a page of migrations, newest first.
type ListMigrationsResponse struct {
	Migrations []*Migration `json:"migrations"`
	// Next is the token of the following page (the request's After); empty on the last page.
	// It is opaque: a client passes it back unchanged.
	Next string `json:"next,omitempty"`
}

// AbortMigrationRequest asks to abort a migration.
type AbortMigrationRequest struct {
	ID     string `json:"id"`
	Reason string `json:"reason,omitempty"`
}

// GetReceiptRequest names the migration whose receipt is wanted.
type GetReceiptRequest struct {
	MigrationID string `json:"migrationId"`
}

// ListReceiptsRequest asks for a page of receipts, by migration id. Its bounds are those of
// ListMigrationsRequest: Limit up to MaxListLimit, a page up to MaxListBytes.
type ListReceiptsRequest struct {
	// Tenant filters by tenant (operators); tenants see their own.
	Tenant string `json:"tenant,omitempty"`
	// Limit is the most receipts a page holds. Zero means DefaultListLimit.
	Limit int `json:"limit,omitempty"`
	// After is the Next of the previous page; empty starts at the first.
	After string `json:"after,omitempty"`
}

// ListReceiptsResponse is a page of receipts, by migration id.
type ListReceiptsResponse struct {
	Receipts []*Receipt `json:"receipts"`
	// Next is the token of the following page; empty on the last page.
	Next string `json:"next,omitempty"`
}

// MigrationEventsRequest reads a page of a migration's events from stream LETHE_EVENTS.
type MigrationEventsRequest struct {
	ID string `json:"id"`
	// After is the stream sequence of the last event already read; 0 reads from the first.
	After uint64 `json:"after,omitempty"`
	// Limit bounds the events returned. Zero or more than MaxEventsPage means MaxEventsPage.
	Limit int `json:"limit,omitempty"`
}

// MaxEventsPage is the most events one migrations.events reply carries; a reply also stops
// short of maxEventsReply bytes.
const MaxEventsPage = 200

// MigrationEventsResponse is a page of a migration's events, oldest first.
type MigrationEventsResponse struct {
	Events []StoredEvent `json:"events"`
	// Next is the sequence to pass as After for the next page: the last event's, or the
	// request's After when there was none.
	Next uint64 `json:"next"`
	// More says that events past this page were already stored when it was read.
	More bool `json:"more,omitempty"`
}

// StoredEvent is an event as stream LETHE_EVENTS keeps it.
type StoredEvent struct {
	// Seq is the event's sequence in the stream.
	Seq   uint64 `json:"seq"`
	Event Event  `json:"event"`
}

// GetPolicyRequest reads the policy the broker holds for a tenant or one of its VMs.
type GetPolicyRequest struct {
	// Tenant: operators only; a tenant reads its own.
	Tenant string `json:"tenant,omitempty"`
	// VM reads the policy that applies to this VM: its own, else the tenant-wide one. Empty
	// reads the tenant-wide policy.
	VM string `json:"vm,omitempty"`
}

// PolicyView is one revision of a policy in the lethe-policies bucket.
type PolicyView struct {
	// Key is the policy's key: <tenant> (tenant-wide) or <tenant>.<vm>.
	Key      string `json:"key"`
	Revision uint64 `json:"revision"`
	PolicyRecord
}

// PolicyHistoryRequest lists the revisions the broker keeps of a policy (the bucket keeps
// the last 5 of each key).
type PolicyHistoryRequest struct {
	// Tenant: operators only; a tenant reads its own.
	Tenant string `json:"tenant,omitempty"`
	// VM names the VM-specific policy; empty means the tenant-wide one.
	VM string `json:"vm,omitempty"`
}

// PolicyHistoryResponse lists a policy's revisions, oldest first.
type PolicyHistoryResponse struct {
	Revisions []PolicyView `json:"revisions"`
}
