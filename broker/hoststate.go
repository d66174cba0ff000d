package broker

import (
	"context"
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Keys of the lethe-fleet bucket: host.<name> holds a HostStateRecord, op.<id> a FleetOp.
const (
	hostStatePrefix = "host."
	fleetOpPrefix   = "op."
)

// maxReason bounds an operator's reason.
const maxReason = 512

// operatorOnly refuses a caller that is not an operator. Fleet operations are served on
// operator subjects alone; this is the second check.
func operatorOnly(c Caller) error {
	if !c.Operator() {
		return fmt.Errorf("%w: operators only", ErrNotFound)
	}
	return nil
}

// setHostState writes host's state if change, given the current record (nil if none), says
// to. change returns an error to refuse.
func (b *Broker) setHostState(ctx context.Context, host string, change func(cur *HostStateRecord) (*HostStateRecord, error)) (*HostStateRecord, error) {
	key := hostStatePrefix + host
	for {
		cur, rev, err := getJSON[HostStateRecord](ctx, b.store.fleet, key)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, err
		}
		next, err := change(cur)
		if err != nil || next == nil {
			return cur, err
		}
		if _, err := updateJSON(ctx, b.store.fleet, key, next, rev); err != nil {
			if errors.Is(err, errRevision) {
				continue
			}
			return nil, err
		}
		b.log.Info("Host state changed", logKeyHost, host, "state", next.State, "by", next.By, logKeyReason, next.Reason)
		b.publishEvent(Event{MigrationID: "host-" + host, Kind: EventAudit, Message: fmt.Sprintf("host %s %s by %s: %s", host, next.State, next.By, next.Reason)})
		b.publishAudit(AuditRecord{Action: AuditHostState, By: next.By, Target: host, Host: host, Reason: next.Reason, State: string(next.State), Operation: next.Operation})
		return next, nil
	}
}

// checkHostArgs checks a host name and an operator's reason.
func checkHostArgs(host, reason string) error {
	if err := agentapi.ValidName(host); err != nil {
		return fmt.Errorf("%w: host: %w", ErrInvalid, err)
	}
	if len(reason) > maxReason {
		return fmt.Errorf("%w: reason longer than %d bytes", ErrInvalid, maxReason)
	}
	return nil
}

func (b *Broker) cordonHost(ctx context.Context, c Caller, req *CordonRequest) (*HostStateRecord, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	if err := checkHostArgs(req.Host, req.Reason); err != nil {
		return nil, err
	}
	return b.setHostState(ctx, req.Host, func(cur *HostStateRecord) (*HostStateRecord, error) {
		if cur != nil && cur.State != HostSchedulable {
			return nil, nil // already kept free of new guests; its reason stays
		}
		return &HostStateRecord{Host: req.Host, State: HostCordoned, Reason: req.Reason, By: c.String(), Since: b.now()}, nil
	})
}

func (b *Broker) uncordonHost(ctx context.Context, c Caller, req *UncordonRequest) (*HostStateRecord, error) {
	if err := operatorOnly(c); err != nil {
		return nil, err
	}
	if err := checkHostArgs(req.Host, ""); err != nil {
		return nil, err
	}
	return b.setHostState(ctx, req.Host, func(cur *HostStateRecord) (*HostStateRecord, error) {
		if cur == nil || cur.State == HostSchedulable {
			return nil, nil
		}
		if cur.State == HostDraining && cur.Operation != "" {
			if op, _, err := getJSON[FleetOp](ctx, b.store.fleet, fleetOpPrefix+cur.Operation); err == nil && !op.State.Terminal() {
				return nil, fmt.Errorf("%w: host %s is being drained by %s: abort it first (lethectl fleet abort %s)", ErrConflict, req.Host, op.ID, op.ID)
			}
		}
		return &HostStateRecord{Host: req.Host, State: HostSchedulable, By: c.String(), Since: b.now()}, nil
	})
}
