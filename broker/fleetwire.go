package broker

import (
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// The fleet operations of the broker API: operators only, served on operator subjects alone.
const (
	OpHostsCordon    Op = "hosts.cordon"
	OpHostsUncordon  Op = "hosts.uncordon"
	OpFleetDrain     Op = "fleet.drain"
	OpFleetEvacuate  Op = "fleet.evacuate"
	OpFleetRebalance Op = "fleet.rebalance"
	OpFleetGet       Op = "fleet.get"
	OpFleetList      Op = "fleet.list"
	OpFleetAbort     Op = "fleet.abort"
)

// OperatorOps lists the operations only operators may call.
var OperatorOps = []Op{OpHostsCordon, OpHostsUncordon, OpFleetDrain, OpFleetEvacuate, OpFleetRebalance,
	OpFleetGet, OpFleetList, OpFleetAbort}

// HostState is what an operator has said of a host, which decides whether guests may land on
// it. A host no one has said anything of is schedulable.
type HostState string

// The states of a host.
const (
	// HostSchedulable: guests may be placed on the host.
	HostSchedulable HostState = "schedulable"
	// HostCordoned: no new guest lands on the host; its guests stay.
	HostCordoned HostState = "cordoned"
	// HostDraining: cordoned, and a fleet operation is moving its guests off.
	HostDraining HostState = "draining"
	// HostMaintenance: cordoned, and a drain moved every guest off it.
	HostMaintenance HostState = "maintenance"
)

// HostStateRecord is the operator's word on a host, kept in the lethe-fleet bucket (the
// agents' host records are theirs, rewritten at every heartbeat).
type HostStateRecord struct {
	Host  string    `json:"host"`
	State HostState `json:"state"`
	// Reason, By and Since say why, who ("operator", or the fleet operation) and when.
	Reason string    `json:"reason,omitempty"`
	By     string    `json:"by"`
	Since  time.Time `json:"since"`
	// Operation is the fleet operation draining the host, if any.
	Operation string `json:"operation,omitempty"`
}

// CordonRequest cordons a host: no new guest lands on it.
type CordonRequest struct {
	Host   string `json:"host"`
	Reason string `json:"reason,omitempty"`
}

// UncordonRequest makes a host schedulable again. It fails while a running fleet operation
// drains the host (abort the operation first).
type UncordonRequest struct {
	Host string `json:"host"`
}

// Limits bound the migrations a fleet operation runs at once. Zero fields take the broker's
// settings (Config.Fleet); migrations started by hand count towards them too.
type Limits struct {
	// MaxParallel is the most migrations in flight across the cluster.
	MaxParallel int `json:"maxParallel,omitempty"`
	// PerSource is the most migrations out of one host at once.
	PerSource int `json:"perSource,omitempty"`
	// PerDestination is the most migrations into one host at once.
	PerDestination int `json:"perDestination,omitempty"`
}

// DrainRequest cordons a host and migrates every guest off it.
type DrainRequest struct {
	Host   string `json:"host"`
	Reason string `json:"reason,omitempty"`
	Limits Limits `json:"limits,omitzero"`
	// Timeout ends the operation: no migration starts after it (those in flight finish).
	// Zero means none.
	Timeout time.Duration `json:"timeout,omitempty"`
	// DryRun plans without cordoning or moving anything.
	DryRun bool `json:"dryRun,omitempty"`
}

// EvacuateRequest drains every host whose TCB is below BelowTCB onto hosts at or above it.
type EvacuateRequest struct {
	// BelowTCB is an SEV-SNP TCB (bl=N,tee=N,snp=N,ucode=N) or a TDX TEE_TCB_SVN (hex):
	// attest.ParseHostTCB's forms.
	BelowTCB string        `json:"belowTcb"`
	Reason   string        `json:"reason,omitempty"`
	Limits   Limits        `json:"limits,omitzero"`
	Timeout  time.Duration `json:"timeout,omitempty"`
	// DryRun lists the hosts below the TCB, their guests, and every guest whose host is below
	// the minimum TCB its tenant's policy states, and moves nothing.
	DryRun bool `json:"dryRun,omitempty"`
}

// RebalanceRequest plans moves that bring every host's committed memory under Threshold, and
// runs them unless DryRun.
type RebalanceRequest struct {
	// Threshold is the fraction of a host's allocatable memory that may be committed, 0 to 1.
	// Zero means the broker's setting.
	Threshold float64 `json:"threshold,omitempty"`
	// MaxMoves bounds the plan. Zero means 10.
	MaxMoves int           `json:"maxMoves,omitempty"`
	Limits   Limits        `json:"limits,omitzero"`
	Timeout  time.Duration `json:"timeout,omitempty"`
	DryRun   bool          `json:"dryRun,omitempty"`
}

// FleetOpKind is what a fleet operation does.
type FleetOpKind string

// The kinds of fleet operation.
const (
	FleetDrain     FleetOpKind = "drain"
	FleetEvacuate  FleetOpKind = "evacuate"
	FleetRebalance FleetOpKind = "rebalance"
)

// FleetOpState is where a fleet operation is.
type FleetOpState string

// The states of a fleet operation.
const (
	FleetRunning  FleetOpState = "running"
	FleetAborting FleetOpState = "aborting"
	FleetAborted  FleetOpState = "aborted"
	// FleetDone: every guest was dealt with; some may have failed or been stuck (see the
	// counts).
	FleetDone FleetOpState = "done"
)

// Terminal reports whether nothing more happens to an operation in state s.
func (s FleetOpState) Terminal() bool { return s == FleetAborted || s == FleetDone }

// FleetItemStatus is where one guest of a fleet operation is.
type FleetItemStatus string

// The statuses of a guest in a fleet operation.
const (
	// ItemWaiting: not started yet (limits, or its turn).
	ItemWaiting FleetItemStatus = "waiting"
	// ItemMigrating: its migration is in flight.
	ItemMigrating FleetItemStatus = "migrating"
	// ItemMoved: its migration committed; Outcome is the receipt's.
	ItemMoved FleetItemStatus = "moved"
	// ItemFailed: its migration aborted, or could not start; the guest runs where it was.
	ItemFailed FleetItemStatus = "failed"
	// ItemStuck: no host admits it (its tenant's policy, capacity, state); it stays put and
	// Reason says why, host by host.
	ItemStuck FleetItemStatus = "stuck"
	// ItemSkipped: the operation was aborted or timed out before the guest's turn.
	ItemSkipped FleetItemStatus = "skipped"
)

// Done reports whether nothing more happens to a guest in status s.
func (s FleetItemStatus) Done() bool { return s != ItemWaiting && s != ItemMigrating }

// FleetItem is one guest of a fleet operation.
type FleetItem struct {
	Tenant      string `json:"tenant"`
	VM          string `json:"vm"`
	From        string `json:"from"`
	MemoryBytes uint64 `json:"memoryBytes"`
	// To is the planned destination (rebalance); empty lets placement choose. Once the
	// migration is created it is its destination.
	To        string          `json:"to,omitempty"`
	Status    FleetItemStatus `json:"status"`
	Migration string          `json:"migration,omitempty"`
	// Outcome is the finished migration's (erased, committed-unverified-erasure, aborted…).
	Outcome string `json:"outcome,omitempty"`
	// Reason says why the guest failed, is stuck or was skipped.
	Reason  string    `json:"reason,omitempty"`
	Started time.Time `json:"started,omitzero"`
	Ended   time.Time `json:"ended,omitzero"`
}

// FleetOp is a fleet operation: a durable record in the lethe-fleet bucket that any broker
// instance can drive, under a lease, as it drives migrations.
type FleetOp struct {
	ID          string       `json:"id"`
	Kind        FleetOpKind  `json:"kind"`
	State       FleetOpState `json:"state"`
	Reason      string       `json:"reason,omitempty"`
	RequestedBy string       `json:"requestedBy"`
	// Hosts are the hosts drained (drain, evacuate); empty for a rebalance.
	Hosts []string `json:"hosts,omitempty"`
	// MinTCB is the TCB every destination must be at least (evacuate).
	MinTCB *attest.HostTCB `json:"minTcb,omitempty"`
	Limits Limits          `json:"limits"`
	// Deadline ends the operation (DrainRequest.Timeout); zero means none.
	Deadline time.Time   `json:"deadline,omitzero"`
	Items    []FleetItem `json:"items"`
	Created  time.Time   `json:"created"`
	Updated  time.Time   `json:"updated"`
	Finished time.Time   `json:"finished,omitzero"`
	// AbortReason says who aborted the operation and why.
	AbortReason string `json:"abortReason,omitempty"`

	Owner      string    `json:"owner,omitempty"`
	LeaseUntil time.Time `json:"leaseUntil,omitzero"`
}

// FleetCounts sums a fleet operation's guests by status, and the memory moved.
type FleetCounts struct {
	Total      int    `json:"total"`
	Waiting    int    `json:"waiting"`
	Migrating  int    `json:"migrating"`
	Moved      int    `json:"moved"`
	Failed     int    `json:"failed"`
	Stuck      int    `json:"stuck"`
	Skipped    int    `json:"skipped"`
	BytesMoved uint64 `json:"bytesMoved"`
	BytesTotal uint64 `json:"bytesTotal"`
}

// Counts sums op's guests by status.
func (op *FleetOp) Counts() FleetCounts {
	c := FleetCounts{Total: len(op.Items)}
	for _, it := range op.Items {
		c.BytesTotal += it.MemoryBytes
		switch it.Status {
		case ItemWaiting:
			c.Waiting++
		case ItemMigrating:
			c.Migrating++
		case ItemMoved:
			c.Moved++
			c.BytesMoved += it.MemoryBytes
		case ItemFailed:
			c.Failed++
		case ItemStuck:
			c.Stuck++
		case ItemSkipped:
			c.Skipped++
		}
	}
	return c
}

// FleetOpView is a fleet operation as the API shows it, with its counts and, while it runs,
// an estimate of the time left from the pace of the guests moved so far.
type FleetOpView struct {
	FleetOp
	Counts FleetCounts `json:"counts"`
	// ETA is the estimated time left; zero when unknown or done.
	ETA time.Duration `json:"eta,omitempty"`
}

// FleetOpResponse answers a drain, evacuation or rebalance: the operation started, or, for a
// dry run, its plan (Operation's items, not recorded, State empty).
type FleetOpResponse struct {
	Operation *FleetOpView `json:"operation"`
	// Plan says, for a dry run, what the operation would do; and for a rebalance, the
	// committed fraction of every host before and after the plan.
	Plan *FleetPlan `json:"plan,omitempty"`
}

// FleetPlan is what a fleet operation would do.
type FleetPlan struct {
	// Hosts are the hosts concerned with their committed memory before and after.
	Hosts []PlanHost `json:"hosts,omitempty"`
	// PolicyViolations lists guests whose current host is below the minimum TCB their
	// tenant's policy states (evacuate dry run).
	PolicyViolations []PolicyViolation `json:"policyViolations,omitempty"`
	// Notes says what the plan could not do or check.
	Notes []string `json:"notes,omitempty"`
}

// PlanHost is one host in a plan.
type PlanHost struct {
	Host             string          `json:"host"`
	TCB              *attest.HostTCB `json:"tcb,omitempty"`
	AllocatableBytes uint64          `json:"allocatableBytes"`
	CommittedBefore  uint64          `json:"committedBefore"`
	CommittedAfter   uint64          `json:"committedAfter"`
}

// PolicyViolation is a guest on a host its policy no longer admits.
type PolicyViolation struct {
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	Host   string `json:"host"`
	Reason string `json:"reason"`
}

// GetFleetOpRequest names a fleet operation.
type GetFleetOpRequest struct {
	ID string `json:"id"`
}

// ListFleetOpsRequest lists fleet operations, newest first.
type ListFleetOpsRequest struct {
	// Active lists only running or aborting operations.
	Active bool `json:"active,omitempty"`
}

// ListFleetOpsResponse lists fleet operations, newest first, without their guests (see
// GetFleetOp).
type ListFleetOpsResponse struct {
	Operations []*FleetOpView `json:"operations"`
	// More says older operations were left out (the answer holds the newest 200).
	More bool `json:"more,omitempty"`
}

// AbortFleetOpRequest aborts a fleet operation: no migration starts any more, and those in
// flight are aborted where they still can be (a committed one finishes).
type AbortFleetOpRequest struct {
	ID     string `json:"id"`
	Reason string `json:"reason,omitempty"`
}
