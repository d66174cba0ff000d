package broker

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natsrpc"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// maxRequest bounds a broker API request.
const maxRequest = 1 << 20

// maxPolicyEnvelope bounds a signed policy envelope.
const maxPolicyEnvelope = 256 << 10

// endpoint adapts a typed handler of a caller's request to a natsrpc.Handler for op: the caller
// is the one the request's subject names.
func endpoint[Req any, Resp any](op Op, fn func(context.Context, Caller, *Req) (Resp, error)) natsrpc.Handler {
	return func(ctx context.Context, r *natsrpc.Request) (any, error) {
		c, err := parseCaller(r.Subject, op)
		if err != nil {
			return nil, err
		}
		var req Req
		if err := natsrpc.Decode(r.Data, &req); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		return fn(ctx, c, &req)
	}
}

// serveAPI starts the broker API service. ctx is the broker's run context; the caller stops
// the returned server.
//
// A request is answered only on a subject under its caller's own inbox (the tenant's, as the
// request subject names it, or the operators'): any other reply subject would make the broker
// publish, with its own permissions (JetStream's API among them), where the sender chose. Such
// a request is dropped unhandled, logged and counted; so is one whose subject names no caller.
// Errors matching the broker's sentinels are answered with their code, and JetStream's failures to
// answer as unavailable (publicError); any other is logged and answered as internal.
func (b *Broker) serveAPI(ctx context.Context) (*natsrpc.Server, error) {
	handlers := map[Op]natsrpc.Handler{
		OpPolicyApply:  endpoint(OpPolicyApply, b.applyPolicy),
		OpHostsList:    endpoint(OpHostsList, b.listHosts),
		OpGuestsList:   endpoint(OpGuestsList, b.listGuests),
		OpGuestsAdopt:  endpoint(OpGuestsAdopt, b.adoptGuest),
		OpGuestsForget: endpoint(OpGuestsForget, b.forgetGuest),
		OpMigrationsCreate: endpoint(OpMigrationsCreate, func(rctx context.Context, c Caller, r *CreateMigrationRequest) (*CreateMigrationResponse, error) {
			return b.createMigration(rctx, ctx, c, r)
		}),
		OpMigrationsGet:  endpoint(OpMigrationsGet, b.getMigration),
		OpMigrationsList: endpoint(OpMigrationsList, b.listMigrations),
		OpMigrationsAbort: endpoint(OpMigrationsAbort, func(rctx context.Context, c Caller, r *AbortMigrationRequest) (*Migration, error) {
			return b.abortMigration(rctx, ctx, c, r)
		}),
		OpReceiptsGet:      endpoint(OpReceiptsGet, b.getReceipt),
		OpReceiptsList:     endpoint(OpReceiptsList, b.listReceipts),
		OpMigrationsEvents: endpoint(OpMigrationsEvents, b.migrationEvents),
		OpPolicyGet:        endpoint(OpPolicyGet, b.getPolicy),
		OpPolicyHistory:    endpoint(OpPolicyHistory, b.policyHistory),
	}
	operatorHandlers := map[Op]natsrpc.Handler{
		OpHostsCordon:    endpoint(OpHostsCordon, b.cordonHost),
		OpHostsUncordon:  endpoint(OpHostsUncordon, b.uncordonHost),
		OpFleetDrain:     endpoint(OpFleetDrain, b.drainHost),
		OpFleetEvacuate:  endpoint(OpFleetEvacuate, b.evacuate),
		OpFleetRebalance: endpoint(OpFleetRebalance, b.rebalance),
		OpFleetGet:       endpoint(OpFleetGet, b.getFleetOp),
		OpFleetList:      endpoint(OpFleetList, b.listFleetOps),
		OpFleetAbort:     endpoint(OpFleetAbort, b.abortFleetOp),
	}
	operatorReply := func(_, reply string) bool { return replyAllowed(reply, natsauth.RoleOperator, "") }
	var eps []natsrpc.Endpoint
	for _, op := range OperatorOps {
		eps = append(eps, natsrpc.Endpoint{Name: "operator_" + strings.ReplaceAll(string(op), ".", "_"), Subject: OperatorSubject(op), Handler: operatorHandlers[op], Reply: operatorReply})
	}
	for _, op := range Ops {
		reply := func(subject, reply string) bool {
			c, err := parseCaller(subject, op)
			if err != nil {
				return false
			}
			role, name := c.inbox()
			return replyAllowed(reply, role, name)
		}
		name := strings.ReplaceAll(string(op), ".", "_")
		eps = append(eps,
			natsrpc.Endpoint{Name: "tenant_" + name, Subject: SubjectPrefix + ".tenant.*." + string(op), Handler: handlers[op], Reply: reply},
			natsrpc.Endpoint{Name: "operator_" + name, Subject: OperatorSubject(op), Handler: handlers[op], Reply: reply})
	}
	srv, err := natsrpc.Start(ctx, natsrpc.Config{
		Conn: b.nc, Name: "lethe-broker", Description: "Lethe migration broker",
		Metadata: map[string]string{"id": b.cfg.ID}, QueueGroup: "lethe-broker",
		Endpoints: eps, Public: publicError,
		InvalidCode: CodeInvalid, BusyCode: CodeUnavailable,
		MaxConcurrent: b.cfg.MaxConcurrentRequests, MaxRequest: maxRequest,
		Logger: b.log,
		// natsrpc logs a refused request with its subject and reply subject.
		Refused: func(string, string) { b.cfg.Metrics.NATSError(natsOpReplyRefused) },
	})
	if err != nil {
		return nil, fmt.Errorf("starting broker API: %w", err)
	}
	return srv, nil
}

func validVM(vm string) error {
	if err := agentapi.ValidName(vm); err != nil {
		return fmt.Errorf("%w: vm: %w", ErrInvalid, err)
	}
	return nil
}

func (b *Broker) applyPolicy(ctx context.Context, c Caller, req *ApplyPolicyRequest) (*ApplyPolicyResponse, error) {
	tenant, err := c.tenantFor(req.Tenant)
	if err != nil {
		return nil, err
	}
	key := tenant
	if req.VM != "" {
		if err := validVM(req.VM); err != nil {
			return nil, err
		}
		key = GuestKey(tenant, req.VM)
	}
	if len(req.Envelope) == 0 || len(req.Envelope) > maxPolicyEnvelope {
		return nil, fmt.Errorf("%w: policy envelope must be 1 to %d bytes", ErrInvalid, maxPolicyEnvelope)
	}
	if b.cfg.ReadPolicy != nil {
		if _, err := b.cfg.ReadPolicy(req.Envelope); err != nil {
			return nil, fmt.Errorf("%w: reading policy: %w", ErrInvalid, err)
		}
	}
	data, err := json.Marshal(PolicyRecord{Tenant: tenant, VM: req.VM, Envelope: req.Envelope, Applied: b.now()})
	if err != nil {
		return nil, fmt.Errorf("encoding policy record: %w", err)
	}
	rev, err := b.store.policies.Put(ctx, key, data)
	if err != nil {
		return nil, fmt.Errorf("storing policy: %w", err)
	}
	b.log.Info("Policy applied", logKeyTenant, tenant, logKeyVM, req.VM)
	b.publishAudit(AuditRecord{Action: AuditPolicyApply, By: c.String(), Target: key, Tenant: tenant, VM: req.VM, Detail: fmt.Sprintf("revision %d", rev)})
	return &ApplyPolicyResponse{Key: key, Revision: rev}, nil
}

// policyFor returns the guest's policy (VM-specific first, then tenant-wide) and its key.
func (b *Broker) policyFor(ctx context.Context, tenant, vm string) (*PolicyRecord, string, error) {
	for _, key := range []string{GuestKey(tenant, vm), tenant} {
		p, _, err := getJSON[PolicyRecord](ctx, b.store.policies, key)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, "", err
		}
		return p, key, nil
	}
	return nil, "", fmt.Errorf("%w: no policy for tenant %s vm %s", ErrNotFound, tenant, vm)
}

func (b *Broker) listHosts(ctx context.Context, c Caller, req *ListHostsRequest) (*ListHostsResponse, error) {
	view, hosts, err := b.newFleetView(ctx)
	if err != nil {
		return nil, err
	}
	now := b.now()
	resp := &ListHostsResponse{Hosts: []HostView{}}
	for _, h := range hosts {
		live, _ := b.fresh(h, now)
		if !live && !req.All {
			continue
		}
		v := HostView{HostRecord: *h, Live: live, State: view.state(h.Host), CommittedBytes: h.CommittedBytes()}
		if c.Operator() {
			v.StateRecord = view.states[h.Host]
			v.ArrivingBytes, v.Incoming, v.Outgoing = view.arriving[h.Host], view.incoming[h.Host], view.outgoing[h.Host]
		} else {
			// A tenant sees whether it may land on a host, not the operator's reasons, nor
			// what other tenants have where.
			v.CommittedBytes, v.MemoryBytes, v.AllocatableBytes = 0, 0, 0
			v.Guests = nil
			for _, g := range h.Guests {
				if g.Tenant == c.Tenant {
					v.Guests = append(v.Guests, g)
				}
			}
		}
		resp.Hosts = append(resp.Hosts, v)
	}
	sort.Slice(resp.Hosts, func(i, j int) bool { return resp.Hosts[i].Host < resp.Hosts[j].Host })
	return resp, nil
}

func (b *Broker) listGuests(ctx context.Context, c Caller, req *ListGuestsRequest) (*ListGuestsResponse, error) {
	tenant, err := c.listScope(req.Tenant)
	if err != nil {
		return nil, err
	}
	filter := ">"
	if tenant != "" {
		filter = tenant + ".*"
	}
	guests, err := listJSON[Guest](ctx, b.store.guests, filter)
	if err != nil {
		return nil, err
	}
	resp := &ListGuestsResponse{Guests: []Guest{}}
	for _, g := range guests {
		if c.sees(g.Tenant) {
			g.WrappedMDK = ""
			resp.Guests = append(resp.Guests, *g)
		}
	}
	sort.Slice(resp.Guests, func(i, j int) bool {
		return GuestKey(resp.Guests[i].Tenant, resp.Guests[i].VM) < GuestKey(resp.Guests[j].Tenant, resp.Guests[j].VM)
	})
	return resp, nil
}

// liveHost returns host's record if the host is live.
func (b *Broker) liveHost(ctx context.Context, host string) (*agentapi.HostRecord, error) {
	if err := agentapi.ValidName(host); err != nil {
		return nil, fmt.Errorf("%w: host: %w", ErrInvalid, err)
	}
	// Read from the bucket, not the view (hostview.go): the request is answered on the
	// guests the host reports now.
	rec, _, err := getJSON[agentapi.HostRecord](ctx, b.store.hosts, host)
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: host %s is not registered", ErrFailedPrecondition, host)
	}
	if err != nil {
		return nil, err
	}
	if live, why := b.fresh(rec, b.now()); !live {
		return nil, fmt.Errorf("%w: %s", ErrFailedPrecondition, why)
	}
	return rec, nil
}

// adoptGuest takes in a guest running on a host: the host's agent attests, the keybroker
// creates epoch 1 and seals MDK_1 to the agent, the broker delivers it and records the guest.
// Adopting a guest again on the host where it already lives, with no migration in progress,
// reissues the current epoch's key to that host's agent (an agent that restarted lost it);
// on any other host it is a conflict.
func (b *Broker) adoptGuest(ctx context.Context, c Caller, req *AdoptGuestRequest) (*Guest, error) {
	tenant, err := c.tenantFor(req.Tenant)
	if err != nil {
		return nil, err
	}
	if err := validVM(req.VM); err != nil {
		return nil, err
	}
	host, err := b.liveHost(ctx, req.Host)
	if err != nil {
		return nil, err
	}
	hg := host.Guest(tenant, req.VM)
	if hg == nil {
		return nil, fmt.Errorf("%w: host %s does not report guest %s of tenant %s", ErrFailedPrecondition, req.Host, req.VM, tenant)
	}
	key := GuestKey(tenant, req.VM)
	existing, _, err := getJSON[Guest](ctx, b.store.guests, key)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	if err == nil && (existing.Host != req.Host || existing.Migration != "") {
		return nil, fmt.Errorf("%w: guest %s is already adopted, on host %s", ErrConflict, key, existing.Host)
	}
	pol, _, err := b.policyFor(ctx, tenant, req.VM)
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: %w", ErrFailedPrecondition, err)
	}
	if err != nil {
		return nil, err
	}
	if existing != nil {
		// The guest lives on this host already: its agent restarted and lost the memory key.
		return b.reissueKey(ctx, host, existing, pol)
	}
	adoptionID := newID("adopt-")
	nonce, err := b.kb.Nonce(ctx, &kbwire.NonceRequest{MigrationID: adoptionID, Role: attest.RoleAdopt})
	if err != nil {
		return nil, fmt.Errorf("getting adoption nonce: %w", err)
	}
	ev, err := b.agents.Attest(ctx, req.Host, &agentapi.AttestRequest{
		MigrationID: adoptionID, Role: attest.RoleAdopt, Nonce: nonce.Nonce, Tenant: tenant, VM: req.VM,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: attesting host %s: %w", ErrUnavailable, req.Host, err)
	}
	ad, err := b.kb.Adopt(ctx, &kbwire.AdoptRequest{
		AdoptionID: adoptionID, Tenant: tenant, VM: req.VM, Policy: pol.Envelope,
		Agent: kbwire.Attestation{Nonce: nonce.Nonce, Evidence: ev},
		Host:  kbwire.Host{Name: host.Host, Labels: host.Labels, Region: host.Region},
	})
	if err != nil {
		b.log.Warn("Adoption refused", logKeyTenant, tenant, logKeyVM, req.VM, logKeyHost, req.Host, logKeyError, err)
		if errors.Is(err, kbwire.CodeAlreadyAdopted) {
			// The broker has no record of the guest but the keybroker has: the broker's record
			// went without the keybroker's forget (guests.forget asks the keybroker first).
			return nil, fmt.Errorf("%w: the keybroker still holds guest %s and its key, of which the broker has no record: %w", ErrConflict, key, err)
		}
		return nil, fmt.Errorf("adopting guest: %w", err)
	}
	if err := b.agents.Keys(ctx, req.Host, &agentapi.KeysRequest{MigrationID: adoptionID, Role: attest.RoleAdopt, SealedKeys: ad.Sealed, Grant: ad.Grant}); err != nil {
		return nil, fmt.Errorf("%w: delivering keys to %s: %w", ErrUnavailable, req.Host, err)
	}
	now := b.now()
	g := &Guest{
		Tenant: tenant, VM: req.VM, Host: req.Host, Platform: host.Platform, Epoch: ad.Epoch,
		WrappedMDK: ad.WrappedMDK, MemoryBytes: hg.MemoryBytes, Adopted: now, Updated: now,
	}
	if _, err := updateJSON(ctx, b.store.guests, key, g, 0); err != nil {
		if errors.Is(err, errRevision) {
			return nil, fmt.Errorf("%w: guest %s was adopted concurrently", ErrConflict, key)
		}
		return nil, err
	}
	b.log.Info("Guest adopted", logKeyTenant, tenant, logKeyVM, req.VM, logKeyHost, req.Host)
	b.publishAudit(AuditRecord{Action: AuditGuestAdopt, By: c.String(), Target: key, Tenant: tenant, VM: req.VM, Host: req.Host})
	g.WrappedMDK = ""
	return g, nil
}

// reissueKey gives the agent of the host where g lives the memory key of g's current epoch
// again: the agent attests afresh (role adopt), the keybroker verifies it against the
// tenant's policy and reseals the key, the broker delivers it. Nothing in the guest record
// changes.
func (b *Broker) reissueKey(ctx context.Context, host *agentapi.HostRecord, g *Guest, pol *PolicyRecord) (*Guest, error) {
	reissueID := newID("reissue-")
	nonce, err := b.kb.Nonce(ctx, &kbwire.NonceRequest{MigrationID: reissueID, Role: attest.RoleAdopt})
	if err != nil {
		return nil, fmt.Errorf("getting reissue nonce: %w", err)
	}
	ev, err := b.agents.Attest(ctx, host.Host, &agentapi.AttestRequest{
		MigrationID: reissueID, Role: attest.RoleAdopt, Nonce: nonce.Nonce, Tenant: g.Tenant, VM: g.VM,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: attesting host %s: %w", ErrUnavailable, host.Host, err)
	}
	re, err := b.kb.Reissue(ctx, &kbwire.ReissueRequest{
		ReissueID: reissueID, Tenant: g.Tenant, VM: g.VM, Policy: pol.Envelope,
		Agent: kbwire.Attestation{Nonce: nonce.Nonce, Evidence: ev},
		Host:  kbwire.Host{Name: host.Host, Labels: host.Labels, Region: host.Region},
	})
	if err != nil {
		b.log.Warn("Key reissue refused", logKeyTenant, g.Tenant, logKeyVM, g.VM, logKeyHost, host.Host, logKeyError, err)
		return nil, fmt.Errorf("reissuing the guest's key: %w", err)
	}
	if err := b.agents.Keys(ctx, host.Host, &agentapi.KeysRequest{MigrationID: reissueID, Role: attest.RoleAdopt, SealedKeys: re.Sealed, Grant: re.Grant}); err != nil {
		return nil, fmt.Errorf("%w: delivering keys to %s: %w", ErrUnavailable, host.Host, err)
	}
	b.log.Info("Guest key reissued", logKeyTenant, g.Tenant, logKeyVM, g.VM, logKeyHost, host.Host, logKeyEpoch, re.Epoch)
	g.WrappedMDK = ""
	return g, nil
}

// createMigration checks and records a migration request (or answers a dry run). Of two
// concurrent requests for one guest exactly one proceeds: the guest record's active migration
// is taken by CAS.
//
// The migration's driver runs with run, the broker's run context: it outlives the request.
func (b *Broker) createMigration(ctx, run context.Context, c Caller, req *CreateMigrationRequest) (*CreateMigrationResponse, error) {
	tenant, err := c.tenantFor(req.Tenant)
	if err != nil {
		return nil, err
	}
	if err := validVM(req.VM); err != nil {
		return nil, err
	}
	key := GuestKey(tenant, req.VM)
	g, grev, err := getJSON[Guest](ctx, b.store.guests, key)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("%w: guest %s is not adopted", ErrNotFound, key)
		}
		return nil, err
	}
	src, err := b.liveHost(ctx, g.Host)
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	hg := src.Guest(tenant, req.VM)
	if hg == nil {
		return nil, fmt.Errorf("%w: source host %s does not report guest %s", ErrFailedPrecondition, g.Host, key)
	}
	pol, polKey, err := b.policyFor(ctx, tenant, req.VM)
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: %w", ErrFailedPrecondition, err)
	}
	if err != nil {
		return nil, err
	}
	view, hosts, err := b.newFleetView(ctx)
	if err != nil {
		return nil, err
	}
	if req.Destination != "" && view.hosts[req.Destination] == nil {
		// The listing may miss a host whose heartbeat replaced its record meanwhile (see
		// listJSON): a destination asked for by name is read by name.
		if h, _, err := getJSON[agentapi.HostRecord](ctx, b.store.hosts, req.Destination); err == nil {
			view.hosts[h.Host] = h
			hosts = append(hosts, h)
		}
	}
	now := b.now()
	verdicts, notes := b.verdicts(hosts, g.Host, g.Platform, pol.Envelope, now)
	o := req.place
	o.tenant = !c.Operator()
	ranked := b.place(view, verdicts, hg.MemoryBytes, src.TCB, o)
	if req.DryRun {
		return &CreateMigrationResponse{DryRun: &DryRun{
			Tenant: tenant, VM: req.VM, Source: g.Host, Platform: g.Platform, PolicyKey: polKey, Hosts: verdicts, Order: ranked, Notes: notes,
		}}, nil
	}
	dests, err := choose(req.Destination, verdicts, ranked)
	if err != nil {
		return nil, err
	}
	id := cmp.Or(req.id, newID("mig-"))
	if g.Migration != "" {
		cur, _, err := getJSON[Migration](ctx, b.store.migrations, g.Migration)
		switch {
		case err == nil && !cur.Phase.Terminal():
			return nil, fmt.Errorf("%w: guest %s is already migrating (%s)", ErrConflict, key, g.Migration)
		case err != nil && !errors.Is(err, ErrNotFound):
			return nil, err
		}
		// A finished or missing migration left the guest marked: take the mark over.
	}
	if req.ahead != nil {
		if err := req.ahead(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
	}
	g.Migration, g.Updated = id, now
	if _, err := updateJSON(ctx, b.store.guests, key, g, grev); err != nil {
		if errors.Is(err, errRevision) {
			return nil, fmt.Errorf("%w: guest %s changed concurrently (another migration request?)", ErrConflict, key)
		}
		return nil, err
	}
	m := &Migration{
		ID: id, Tenant: tenant, VM: req.VM, Source: g.Host, Destination: dests[0], Platform: g.Platform,
		MemoryBytes: hg.MemoryBytes, Epoch: g.Epoch, Phase: PhaseRequested, RequestedBy: c.String() + viaOpOrNone(req.operation),
		Created: now, PhaseSince: now, Updated: now, Timeline: []PhaseEntry{{Phase: PhaseRequested, Entered: now}},
	}
	if req.Destination == "" {
		// Placement's next choices, for when the first refuses.
		m.Candidates = dests[1:min(len(dests), b.cfg.MaxAttempts)]
	}
	// The Requested event goes out before the record, whose creation starts the drivers.
	b.publishEvent(Event{MigrationID: id, Kind: EventPhase, Phase: PhaseRequested, Message: "requested by " + c.String()})
	if _, err := updateJSON(ctx, b.store.migrations, id, m, 0); err != nil {
		b.publishEvent(Event{MigrationID: id, Kind: EventAudit, Message: "request not recorded"})
		_ = b.updateGuest(ctx, tenant, req.VM, func(g *Guest) bool {
			if g.Migration != id {
				return false
			}
			g.Migration = ""
			return true
		})
		return nil, fmt.Errorf("recording migration: %w", err)
	}
	b.noteActive(m)
	b.publishAudit(AuditRecord{Action: AuditMigrationRequest, By: c.String(), Target: id, Tenant: tenant, VM: req.VM, Host: m.Destination,
		Operation: req.operation, Detail: m.Source + " → " + m.Destination})
	b.log.Info("Migration requested", logKeyMigration, id, logKeyTenant, tenant, logKeyVM, req.VM,
		logKeyHost, m.Destination, "by", c.String())
	b.drive(run, id)
	return &CreateMigrationResponse{Migration: m.public()}, nil
}

// visibleMigration returns migration id if the caller may see it.
func (b *Broker) visibleMigration(ctx context.Context, c Caller, id string) (*Migration, uint64, error) {
	if err := agentapi.ValidName(id); err != nil {
		return nil, 0, fmt.Errorf("%w: migration id: %w", ErrInvalid, err)
	}
	m, rev, err := b.findMigration(ctx, id)
	if err != nil {
		return nil, 0, err
	}
	if !c.sees(m.Tenant) {
		return nil, 0, fmt.Errorf("%w: migration %s", ErrNotFound, id)
	}
	return m, rev, nil
}

func (b *Broker) getMigration(ctx context.Context, c Caller, req *GetMigrationRequest) (*Migration, error) {
	m, _, err := b.visibleMigration(ctx, c, req.ID)
	if err != nil {
		return nil, err
	}
	return m.public(), nil
}

func (b *Broker) listMigrations(ctx context.Context, c Caller, req *ListMigrationsRequest) (*ListMigrationsResponse, error) {
	want, err := c.listScope(req.Tenant)
	if err != nil {
		return nil, err
	}
	state := req.State
	if req.Active && state == "" {
		state = ListActive
	}
	if state != "" && state != ListActive && state != ListEnded {
		return nil, fmt.Errorf("%w: state %q: want %s or %s", ErrInvalid, state, ListActive, ListEnded)
	}
	limit := cmp.Or(req.Limit, DefaultListLimit)
	if limit < 0 || limit > MaxListLimit {
		return nil, fmt.Errorf("%w: limit %d: want 1 to %d", ErrInvalid, req.Limit, MaxListLimit)
	}
	var after listCursor
	if req.After != "" {
		var err error
		if after, err = parseListCursor(req.After); err != nil {
			return nil, err
		}
	}
	all, err := listJSON[Migration](ctx, b.store.migrations, ">")
	if err != nil {
		return nil, err
	}
	if req.Archived {
		archived, err := listJSON[Migration](ctx, b.store.archive, ">")
		if err != nil {
			return nil, err
		}
		// A migration being archived is in both buckets for a moment: list it once.
		live := make(map[string]bool, len(all))
		for _, m := range all {
			live[m.ID] = true
		}
		for _, m := range archived {
			if !live[m.ID] {
				all = append(all, m)
			}
		}
	}
	var match []*Migration
	for _, m := range all {
		if (want != "" && m.Tenant != want) || !c.sees(m.Tenant) || (req.VM != "" && m.VM != req.VM) ||
			(state == ListActive && m.Phase.Terminal()) || (state == ListEnded && !m.Phase.Terminal()) {
			continue
		}
		if req.After != "" && !after.before(m) {
			continue
		}
		match = append(match, m)
	}
	slices.SortFunc(match, func(x, y *Migration) int {
		return cmp.Or(y.Created.Compare(x.Created), strings.Compare(y.ID, x.ID))
	})
	return migrationsPage(match, limit)
}

// migrationsPage returns the first limit migrations of ms (sorted newest first) whose
// encoding fits MaxListBytes, and the token of the next page if ms holds more.
func migrationsPage(ms []*Migration, limit int) (*ListMigrationsResponse, error) {
	resp := &ListMigrationsResponse{Migrations: []*Migration{}}
	size := 0
	for _, m := range ms {
		if len(resp.Migrations) == limit {
			break
		}
		p := m.public()
		data, err := json.Marshal(p)
		if err != nil {
			return nil, fmt.Errorf("encoding migration %s: %w", m.ID, err)
		}
		if size+len(data)+1 > MaxListBytes && len(resp.Migrations) > 0 {
			break
		}
		size += len(data) + 1
		resp.Migrations = append(resp.Migrations, p)
	}
	if len(resp.Migrations) < len(ms) {
		last := resp.Migrations[len(resp.Migrations)-1]
		resp.Next = listCursor{created: last.Created, id: last.ID}.String()
	}
	return resp, nil
}

// listCursor is where a page of migrations.list ended: the creation time and id of its last
// migration. Its text form, the page's Next, is opaque to clients.
type listCursor struct {
	created time.Time
	id      string
}

func (c listCursor) String() string {
	return base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "%d/%s", c.created.UnixNano(), c.id))
}

func parseListCursor(s string) (listCursor, error) {
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return listCursor{}, fmt.Errorf("%w: after: not a page token", ErrInvalid)
	}
	ns, id, ok := strings.Cut(string(raw), "/")
	n, err := strconv.ParseInt(ns, 10, 64)
	if !ok || err != nil || id == "" {
		return listCursor{}, fmt.Errorf("%w: after: not a page token", ErrInvalid)
	}
	return listCursor{created: time.Unix(0, n), id: id}, nil
}

// before says m comes after the cursor in the listing's order (newest first, then by id
// descending), that is on a later page.
func (c listCursor) before(m *Migration) bool {
	switch n := m.Created.UnixNano(); {
	case n != c.created.UnixNano():
		return n < c.created.UnixNano()
	default:
		return m.ID < c.id
	}
}

// abortMigration moves a migration to Aborting. Once cutover has started only the broker
// itself (timeout, agent loss) may abort: a request is refused with ErrConflict.
//
// The migration's driver runs with run, the broker's run context.
func (b *Broker) abortMigration(ctx, run context.Context, c Caller, req *AbortMigrationRequest) (*Migration, error) {
	for {
		m, rev, err := b.visibleMigration(ctx, c, req.ID)
		if err != nil {
			return nil, err
		}
		switch {
		case m.Phase == PhaseAborting || m.Phase == PhaseAborted:
			return m.public(), nil
		case !m.Phase.Abortable() || m.Phase == PhaseCuttingOver:
			return nil, fmt.Errorf("%w: migration %s is %s, past the point of abort", ErrConflict, m.ID, m.Phase)
		}
		now := b.now()
		from := m.Phase
		m.enter(PhaseAborting, now)
		m.AbortReason = "requested by " + c.String()
		if req.Reason != "" {
			m.AbortReason += ": " + req.Reason
		}
		if _, err := updateJSON(ctx, b.store.migrations, m.ID, m, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return nil, err
		}
		b.log.Info("Migration phase changed", logKeyMigration, m.ID, logKeyFrom, from, logKeyPhase, PhaseAborting, logKeyReason, m.AbortReason)
		b.publishEvent(Event{MigrationID: m.ID, Kind: EventPhase, From: from, Phase: PhaseAborting, Message: m.AbortReason})
		b.publishAudit(AuditRecord{Action: AuditMigrationAbort, By: c.String(), Target: m.ID, Reason: req.Reason, Tenant: m.Tenant, VM: m.VM, State: string(from)})
		b.drive(run, m.ID)
		return m.public(), nil
	}
}

func (b *Broker) getReceipt(ctx context.Context, c Caller, req *GetReceiptRequest) (*Receipt, error) {
	if err := agentapi.ValidName(req.MigrationID); err != nil {
		return nil, fmt.Errorf("%w: migration id: %w", ErrInvalid, err)
	}
	r, _, err := getJSON[Receipt](ctx, b.store.receipts, req.MigrationID)
	if err != nil {
		return nil, err
	}
	if !c.sees(r.Tenant) {
		return nil, fmt.Errorf("%w: receipt of %s", ErrNotFound, req.MigrationID)
	}
	return r, nil
}

// listReceipts returns a page of the caller's receipts (an operator's: of every tenant, or of
// req.Tenant), by migration id. It reads the whole receipts bucket, which keeps receipts for
// Config.ReceiptRetention: it is for exports, not for every check.
func (b *Broker) listReceipts(ctx context.Context, c Caller, req *ListReceiptsRequest) (*ListReceiptsResponse, error) {
	want, err := c.listScope(req.Tenant)
	if err != nil {
		return nil, err
	}
	limit := cmp.Or(req.Limit, DefaultListLimit)
	if limit < 0 || limit > MaxListLimit {
		return nil, fmt.Errorf("%w: limit %d: want 1 to %d", ErrInvalid, req.Limit, MaxListLimit)
	}
	all, err := listJSON[Receipt](ctx, b.store.receipts, ">")
	if err != nil {
		return nil, err
	}
	var match []*Receipt
	for _, r := range all {
		if (want == "" || r.Tenant == want) && c.sees(r.Tenant) && r.MigrationID > req.After {
			match = append(match, r)
		}
	}
	slices.SortFunc(match, func(x, y *Receipt) int { return strings.Compare(x.MigrationID, y.MigrationID) })
	resp := &ListReceiptsResponse{Receipts: []*Receipt{}}
	size := 0
	for _, r := range match {
		data, err := json.Marshal(r)
		if err != nil {
			return nil, fmt.Errorf("encoding receipt %s: %w", r.MigrationID, err)
		}
		if len(resp.Receipts) == limit || (size+len(data)+1 > MaxListBytes && len(resp.Receipts) > 0) {
			resp.Next = resp.Receipts[len(resp.Receipts)-1].MigrationID
			break
		}
		size += len(data) + 1
		resp.Receipts = append(resp.Receipts, r)
	}
	return resp, nil
}
