// Package agentapitest provides a hand-written fake migration agent implementing
// agentapi.Handler, for tests of the broker and of lethectl. It moves no pages and holds no
// keys: its evidence is marked fake and verifies nowhere. It must never be linked into a
// production binary.
package agentapitest

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Call is one request the fake received.
type Call struct {
	Op          agentapi.Op
	MigrationID string
}

// Agent is a fake agent. Its zero value is not usable; create it with New.
type Agent struct {
	// Host is the host the fake serves.
	Host string
	// Platform is the platform of its evidence.
	Platform attest.Platform
	// AutoCommit makes a transfer run to commit at once (precopy, cutover, committed); when
	// false the transfer stays in precopy until Commit or Fail is called.
	AutoCommit bool
	// Now stamps progress reports. Nil means time.Now.
	Now func() time.Time
	// RefusePrepare, if not nil, is Prepare's answer: a destination that will not take the
	// guest (a real agent answers agentapi.ErrConflict when it has no room).
	RefusePrepare error
	// Lanes is what Prepare answers the destination accepts beyond the first stream.
	Lanes int

	mu         sync.Mutex
	calls      []Call
	migrations map[string]*migration
}

type migration struct {
	role     attest.Role
	transfer agentapi.TransferRequest // the first transfer request
	report   agentapi.ProgressFunc
	progress *agentapi.Progress
	keys     bool
	erased   bool
	aborted  bool
	resumed  bool
}

// New returns a fake agent of host on platform.
func New(host string, platform attest.Platform) *Agent {
	return &Agent{Host: host, Platform: platform, migrations: map[string]*migration{}}
}

func (a *Agent) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

func (a *Agent) record(op agentapi.Op, id string) *migration {
	a.calls = append(a.calls, Call{Op: op, MigrationID: id})
	m, ok := a.migrations[id]
	if !ok {
		m = &migration{}
		a.migrations[id] = m
	}
	return m
}

// Calls returns the requests received so far.
func (a *Agent) Calls() []Call {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Call(nil), a.calls...)
}

// CallCount returns how many requests of op for migration id the fake received.
func (a *Agent) CallCount(op agentapi.Op, id string) int {
	n := 0
	for _, c := range a.Calls() {
		if c.Op == op && c.MigrationID == id {
			n++
		}
	}
	return n
}

// TransferRequest returns the first transfer request the fake received for migration id.
func (a *Agent) TransferRequest(id string) (agentapi.TransferRequest, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.migrations[id]
	if !ok || m.progress == nil {
		return agentapi.TransferRequest{}, false
	}
	return m.transfer, true
}

// State reports what the fake did for migration id: holds keys, erased, aborted, resumed.
func (a *Agent) State(id string) (keys, erased, aborted, resumed bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.migrations[id]
	if !ok {
		return false, false, false, false
	}
	return m.keys, m.erased, m.aborted, m.resumed
}

func (a *Agent) evidence(id string, role attest.Role, nonce []byte, statement any) (*attest.Evidence, error) {
	st, err := json.Marshal(statement)
	if err != nil {
		return nil, err
	}
	raw := fmt.Appendf(nil, "fake-evidence host=%s migration=%s role=%s nonce=%x", a.Host, id, role, nonce)
	return &attest.Evidence{Platform: a.Platform, Raw: raw, HPKEPublicKey: []byte(rand.Text()), Statement: st}, nil
}

// Attest implements agentapi.Handler.
func (a *Agent) Attest(_ context.Context, req *agentapi.AttestRequest) (*attest.Evidence, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.record(agentapi.OpAttest, req.MigrationID)
	m.role = req.Role
	return a.evidence(req.MigrationID, req.Role, req.Nonce, map[string]string{"fake": "identity"})
}

// Prepare implements agentapi.Handler.
func (a *Agent) Prepare(_ context.Context, req *agentapi.PrepareRequest) (*agentapi.PrepareResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.RefusePrepare != nil {
		a.calls = append(a.calls, Call{Op: agentapi.OpPrepare, MigrationID: req.MigrationID})
		return nil, a.RefusePrepare
	}
	m := a.record(agentapi.OpPrepare, req.MigrationID)
	m.role = attest.RoleDestination
	ev, err := a.evidence(req.MigrationID, attest.RoleDestination, req.Nonce, map[string]any{"zeroed": true, "bytes": req.MemoryBytes})
	if err != nil {
		return nil, err
	}
	return &agentapi.PrepareResponse{Evidence: ev, DataEndpoint: a.Host + ".data:7400", Lanes: a.Lanes}, nil
}

// Keys implements agentapi.Handler.
func (a *Agent) Keys(_ context.Context, req *agentapi.KeysRequest) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.record(agentapi.OpKeys, req.MigrationID)
	if len(req.SealedKeys) == 0 {
		return fmt.Errorf("%w: no sealed keys", agentapi.ErrBadRequest)
	}
	m.keys = true
	return nil
}

// Transfer implements agentapi.Handler.
func (a *Agent) Transfer(_ context.Context, req *agentapi.TransferRequest, report agentapi.ProgressFunc) (*agentapi.Progress, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.record(agentapi.OpTransfer, req.MigrationID)
	if !m.keys {
		return nil, fmt.Errorf("%w: no keys for %s", agentapi.ErrBadRequest, req.MigrationID)
	}
	m.report = report
	if m.progress != nil {
		p := *m.progress
		return &p, nil
	}
	m.transfer = *req
	m.progress = &agentapi.Progress{MigrationID: req.MigrationID, Phase: agentapi.TransferStarted, TotalBytes: 1 << 20, Time: a.now()}
	p := *m.progress
	if a.AutoCommit {
		go func() { _ = a.Commit(req.MigrationID) }()
	}
	return &p, nil
}

// FakeDowntime and FakeRounds are what Commit reports as the transfer's downtime and rounds.
var (
	FakeDowntime = 42 * time.Millisecond
	FakeRounds   = []agentapi.RoundStats{
		{Round: 1, Pages: 256, Bytes: 1 << 20, DirtyRate: 4096, Throughput: 1 << 30, Duration: time.Millisecond},
		{Round: 2, Final: true, Pages: 1, Bytes: 4096, Throughput: 1 << 22, Duration: time.Millisecond},
	}
)

// Report publishes p for migration id as the transfer's progress (and keeps it as its state).
func (a *Agent) Report(id string, p agentapi.Progress) error {
	a.mu.Lock()
	m, ok := a.migrations[id]
	if !ok || m.report == nil {
		a.mu.Unlock()
		return fmt.Errorf("no transfer for %s", id)
	}
	p.MigrationID = id
	p.Time = a.now()
	m.progress = &p
	report := m.report
	a.mu.Unlock()
	return report(p)
}

// Commit runs the transfer of migration id to its commit: precopy, cutover, committed.
func (a *Agent) Commit(id string) error {
	steps := []agentapi.Progress{
		{Phase: agentapi.TransferPrecopy, Bytes: 1 << 20, Pages: 256, TotalBytes: 1 << 20, Round: 1, DirtyRate: 4096, ETA: time.Second},
		{Phase: agentapi.TransferCutover, Bytes: 1 << 20, Pages: 256, TotalBytes: 1 << 20, Round: 2},
		{Phase: agentapi.TransferCommitted, Bytes: 1 << 20, Pages: 256, TotalBytes: 1 << 20, Round: 2, CommitAck: []byte("fake-commit-ack"),
			Downtime: FakeDowntime, DowntimeSource: agentapi.DowntimeAgent, Rounds: FakeRounds},
	}
	for _, p := range steps {
		if err := a.Report(id, p); err != nil {
			return err
		}
	}
	return nil
}

// Fail ends the transfer of migration id with an error.
func (a *Agent) Fail(id, reason string) error {
	return a.Report(id, agentapi.Progress{Phase: agentapi.TransferFailed, Error: reason})
}

// Status implements agentapi.Handler.
func (a *Agent) Status(_ context.Context, req *agentapi.StatusRequest) (*agentapi.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.migrations[req.MigrationID]
	a.calls = append(a.calls, Call{Op: agentapi.OpStatus, MigrationID: req.MigrationID})
	if !ok {
		return &agentapi.Status{MigrationID: req.MigrationID}, nil
	}
	return &agentapi.Status{MigrationID: req.MigrationID, Role: m.role, Known: true, KeysHeld: m.keys,
		Transfer: m.progress, Erased: m.erased, Aborted: m.aborted}, nil
}

// Erase implements agentapi.Handler.
func (a *Agent) Erase(_ context.Context, req *agentapi.EraseRequest) (*attest.Evidence, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.record(agentapi.OpErase, req.MigrationID)
	committed := m.progress != nil && m.progress.Phase == agentapi.TransferCommitted
	if !committed && !m.aborted {
		return nil, fmt.Errorf("%w: %s is neither committed nor aborted", agentapi.ErrConflict, req.MigrationID)
	}
	m.keys, m.erased = false, true
	return a.evidence(req.MigrationID, attest.RoleErased, req.Nonce, map[string]any{"keysZeroized": true, "scrubbedBytes": 1 << 20})
}

// Abort implements agentapi.Handler.
func (a *Agent) Abort(_ context.Context, req *agentapi.AbortRequest) (*agentapi.AbortResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.record(agentapi.OpAbort, req.MigrationID)
	if m.progress != nil && m.progress.Phase == agentapi.TransferCommitted {
		return &agentapi.AbortResponse{Committed: true, CommitAck: m.progress.CommitAck}, nil
	}
	m.keys, m.aborted = false, true
	resp := &agentapi.AbortResponse{Statement: json.RawMessage(`{"keysZeroized":true}`)}
	if m.role == attest.RoleSource {
		m.resumed, resp.Resumed = true, true
	}
	return resp, nil
}

// Record returns a host record for the fake, listing guests.
func (a *Agent) Record(region string, labels map[string]string, guests ...agentapi.HostGuest) agentapi.HostRecord {
	return agentapi.HostRecord{Host: a.Host, Platform: a.Platform, Labels: labels, Region: region,
		DataAddr: a.Host + ".data:7400", Guests: guests, Heartbeat: a.now()}
}
