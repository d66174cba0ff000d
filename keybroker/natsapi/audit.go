package natsapi

import (
	"context"
	"encoding/json"
	"sync/atomic"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker"
)

// AuditSubject returns the subject the keybroker publishes audit events of kind on:
// lethe.v1.audit.keybroker.<kind>, which stream LETHE_AUDIT keeps (docs/audit.md).
func AuditSubject(kind keybroker.EventKind) string {
	return natsauth.KeybrokerAuditPrefix + "." + string(kind)
}

// AuditPublisher is a keybroker.AuditSink that publishes each event, as JSON, on its
// AuditSubject. Publishing never blocks a decision: it hands the message to the connection's
// buffer and returns (fire and forget), so an event is lost, and counted through Failed, when
// the connection is closed or its reconnect buffer full. Events before SetConn are lost too.
// Use it beside a sink that keeps every event (keybroker.SlogAudit, in keybroker.AuditSinks).
type AuditPublisher struct {
	// Failed, if set, is called once per event that could not be published.
	Failed func()

	conn atomic.Pointer[nats.Conn]
}

// SetConn sets the connection events are published on. Its user needs the keybroker's
// permissions (natsauth.UserPermissions).
func (p *AuditPublisher) SetConn(nc *nats.Conn) { p.conn.Store(nc) }

// Audit implements keybroker.AuditSink.
func (p *AuditPublisher) Audit(_ context.Context, ev keybroker.Event) {
	nc := p.conn.Load()
	if nc == nil {
		p.failed()
		return
	}
	data, err := json.Marshal(ev)
	if err != nil {
		p.failed()
		return
	}
	if err := nc.Publish(AuditSubject(ev.Kind), data); err != nil {
		p.failed()
	}
}

func (p *AuditPublisher) failed() {
	if p.Failed != nil {
		p.Failed()
	}
}
