package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// refusalMetrics counts the broker's NATS error ops, among them refused replies.
type refusalMetrics struct {
	mu     sync.Mutex
	counts map[string]int
	signal chan struct{}
}

func newRefusalMetrics() *refusalMetrics {
	return &refusalMetrics{counts: map[string]int{}, signal: make(chan struct{}, 1)}
}

func (m *refusalMetrics) PhaseChanged(broker.Phase, broker.Phase, time.Duration) {}
func (m *refusalMetrics) Handshake(time.Duration)                                {}
func (m *refusalMetrics) Downtime(time.Duration)                                 {}
func (m *refusalMetrics) Unfinished(map[broker.Phase]int)                        {}
func (m *refusalMetrics) FleetGuest(string, string, time.Duration)               {}
func (m *refusalMetrics) FleetQueue(int, int)                                    {}
func (m *refusalMetrics) NATSError(op string) {
	m.mu.Lock()
	m.counts[op]++
	m.mu.Unlock()
	select {
	case m.signal <- struct{}{}:
	default:
	}
}

func (m *refusalMetrics) count(op string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.counts[op]
}

// waitCount waits until op has been counted n times, and fails the test after 10 s.
func (m *refusalMetrics) waitCount(t *testing.T, op string, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for m.count(op) < n {
		select {
		case <-m.signal:
		case <-deadline:
			t.Fatalf("%s counted %d times, want %d", op, m.count(op), n)
		}
	}
}

// outcome is what becomes of one attempt.
type outcome string

const (
	allowed   outcome = "allowed"
	violation outcome = "permission violation"
	refused   outcome = "refused by the server side"
)

// TestReplyDeputyMatrix takes every role in turn, connected as its own NATS user to a real
// server started with the generated configuration, and tries every class of subject: its own,
// another tenant's or host's, JetStream's API and key-value subjects (with and without a
// roll-up header), other users' inboxes, and requests whose reply subject is not its own
// inbox. Publishing is either allowed or a permission violation; a request with a foreign reply
// subject is refused by the server side (dropped unanswered and counted), and every bucket and
// stream is still there at the end.
func TestReplyDeputyMatrix(t *testing.T) {
	e := authEnv(t)
	metrics := newRefusalMetrics()
	e.cfg.Metrics = metrics
	e.standard()
	js := e.jetstream()
	streams := []string{"KV_" + broker.MigrationsBucket, "KV_" + broker.HostsBucket, "KV_" + broker.PoliciesBucket,
		"KV_" + broker.GuestsBucket, "KV_" + broker.ReceiptsBucket, broker.EventsStream, broker.AuditStream}
	hostRec := func(host string) []byte {
		b, _ := json.Marshal(agentapi.HostRecord{Host: host, Platform: attest.PlatformEmulatedSEVSNP, Heartbeat: time.Now()})
		return b
	}
	rollup := nats.Header{"Nats-Rollup": []string{"all"}}

	type attempt struct {
		role    natsauth.Role
		name    string
		subject string
		reply   string
		header  nats.Header
		data    []byte
		want    outcome
	}
	tests := map[string]attempt{
		// The broker: its own JetStream, calls, events and answers to its callers.
		"broker/own events":                 {role: natsauth.RoleBroker, subject: broker.EventsSubject("m1"), want: allowed},
		"broker/own audit records":          {role: natsauth.RoleBroker, subject: broker.AuditSubject(broker.AuditHostState), want: allowed},
		"broker/the keybroker's audit":      {role: natsauth.RoleBroker, subject: "lethe.v1.audit.keybroker.release", want: violation},
		"broker/calls an agent":             {role: natsauth.RoleBroker, subject: agentapi.Subject("h1", agentapi.OpStatus), reply: agentapi.ReplyPrefix("h1") + "x", data: []byte(`{"migrationId":"m0"}`), want: allowed},
		"broker/JetStream API":              {role: natsauth.RoleBroker, subject: "$JS.API.STREAM.INFO.KV_lethe-hosts", want: violation},
		"broker/JetStream delete":           {role: natsauth.RoleBroker, subject: "$JS.API.STREAM.DELETE.KV_lethe-hosts", want: violation},
		"broker/KV":                         {role: natsauth.RoleBroker, subject: "$KV.lethe-hosts.h1", data: hostRec("h1"), want: violation},
		"broker/KV rollup":                  {role: natsauth.RoleBroker, subject: "$KV.lethe-hosts.h1", header: rollup, data: hostRec("h1"), want: violation},
		"broker/answers a tenant":           {role: natsauth.RoleBroker, subject: "_INBOX.tenant.acme.x", want: allowed},
		"broker/keybroker's inbox":          {role: natsauth.RoleBroker, subject: "_INBOX.keybroker.x", want: violation},
		"broker/forges progress":            {role: natsauth.RoleBroker, subject: agentapi.ProgressSubject("h1", "m1"), want: violation},
		"broker/agent with foreign reply":   {role: natsauth.RoleBroker, subject: agentapi.Subject("h1", agentapi.OpStatus), reply: "$JS.API.STREAM.DELETE.KV_lethe-hosts", data: []byte(`{"migrationId":"m1"}`), want: refused},
		"broker/agent with another's reply": {role: natsauth.RoleBroker, subject: agentapi.Subject("h1", agentapi.OpStatus), reply: agentapi.ReplyPrefix("h2") + "x", data: []byte(`{"migrationId":"m1"}`), want: refused},

		// The broker's store user: JetStream and Lethe's buckets, nothing else; it serves nothing.
		"broker-store/own JetStream":     {role: natsauth.RoleBrokerStore, subject: "$JS.API.STREAM.INFO.KV_lethe-hosts", reply: "_INBOX.broker-store.x", want: allowed},
		"broker-store/own bucket":        {role: natsauth.RoleBrokerStore, subject: "$KV.lethe-hosts.h1", data: hostRec("h1"), want: allowed},
		"broker-store/foreign bucket":    {role: natsauth.RoleBrokerStore, subject: "$KV.other.k", want: violation},
		"broker-store/events":            {role: natsauth.RoleBrokerStore, subject: broker.EventsSubject("m1"), want: violation},
		"broker-store/calls an agent":    {role: natsauth.RoleBrokerStore, subject: agentapi.Subject("h1", agentapi.OpStatus), want: violation},
		"broker-store/calls keybroker":   {role: natsauth.RoleBrokerStore, subject: "lethe.v1.keybroker.release", want: violation},
		"broker-store/answers a tenant":  {role: natsauth.RoleBrokerStore, subject: "_INBOX.tenant.acme.x", want: violation},
		"broker-store/answers an agent":  {role: natsauth.RoleBrokerStore, subject: "_INBOX.agent.h1.x", want: violation},
		"broker-store/broker's inbox":    {role: natsauth.RoleBrokerStore, subject: "_INBOX.broker.x", want: violation},
		"broker-store/service discovery": {role: natsauth.RoleBrokerStore, subject: "$SRV.PING", want: violation},

		// The keybroker: events, and answers to the broker and operators only.
		"keybroker/own events":          {role: natsauth.RoleKeybroker, subject: broker.EventsSubject("m1"), want: allowed},
		"keybroker/own audit records":   {role: natsauth.RoleKeybroker, subject: "lethe.v1.audit.keybroker.release", want: allowed},
		"keybroker/the broker's audit":  {role: natsauth.RoleKeybroker, subject: broker.AuditSubject(broker.AuditHostState), want: violation},
		"keybroker/answers the broker":  {role: natsauth.RoleKeybroker, subject: "_INBOX.broker.x", want: allowed},
		"keybroker/answers an operator": {role: natsauth.RoleKeybroker, subject: "_INBOX.operator.x", want: allowed},
		"keybroker/JetStream API":       {role: natsauth.RoleKeybroker, subject: "$JS.API.STREAM.DELETE.KV_lethe-hosts", want: violation},
		"keybroker/KV":                  {role: natsauth.RoleKeybroker, subject: "$KV.lethe-hosts.h1", data: hostRec("h1"), want: violation},
		"keybroker/KV rollup":           {role: natsauth.RoleKeybroker, subject: "$KV.lethe-hosts.h1", header: rollup, data: hostRec("h1"), want: violation},
		"keybroker/a tenant's inbox":    {role: natsauth.RoleKeybroker, subject: "_INBOX.tenant.acme.x", want: allowed}, // answers policy.publish and tenant.rotate-key
		"keybroker/an agent's inbox":    {role: natsauth.RoleKeybroker, subject: "_INBOX.agent.h1.x", want: violation},
		"keybroker/calls an agent":      {role: natsauth.RoleKeybroker, subject: agentapi.Subject("h1", agentapi.OpAbort), want: violation},

		// An operator: the broker's operator API and tenant registration.
		"operator/own API":                  {role: natsauth.RoleOperator, subject: broker.OperatorSubject(broker.OpHostsList), reply: "_INBOX.operator.x", want: allowed},
		"operator/registers a tenant":       {role: natsauth.RoleOperator, subject: "lethe.v1.keybroker.tenant.register", reply: "_INBOX.operator.x", want: allowed},
		"operator/service discovery":        {role: natsauth.RoleOperator, subject: "$SRV.PING", reply: "$JS.API.STREAM.DELETE.KV_lethe-hosts", want: violation},
		"operator/JetStream API":            {role: natsauth.RoleOperator, subject: "$JS.API.STREAM.DELETE.KV_lethe-hosts", want: violation},
		"operator/KV rollup":                {role: natsauth.RoleOperator, subject: "$KV.lethe-hosts.h1", header: rollup, data: hostRec("h1"), want: violation},
		"operator/a tenant's inbox":         {role: natsauth.RoleOperator, subject: "_INBOX.tenant.acme.x", want: violation},
		"operator/the broker's inbox":       {role: natsauth.RoleOperator, subject: "_INBOX.broker.x", want: violation},
		"operator/keybroker release":        {role: natsauth.RoleOperator, subject: "lethe.v1.keybroker.release", want: violation},
		"operator/broker, JetStream reply":  {role: natsauth.RoleOperator, subject: broker.OperatorSubject(broker.OpHostsList), reply: "$JS.API.STREAM.DELETE.KV_lethe-migrations", want: refused},
		"operator/broker, a tenant's inbox": {role: natsauth.RoleOperator, subject: broker.OperatorSubject(broker.OpHostsList), reply: "_INBOX.tenant.acme.x", want: refused},

		// A tenant: its own broker API only.
		"tenant/own API":                      {role: natsauth.RoleTenant, name: "acme", subject: broker.TenantSubject("acme", broker.OpMigrationsList), reply: "_INBOX.tenant.acme.x", want: allowed},
		"tenant/another tenant's API":         {role: natsauth.RoleTenant, name: "acme", subject: broker.TenantSubject("globex", broker.OpMigrationsList), want: violation},
		"tenant/publishes a policy":           {role: natsauth.RoleTenant, name: "acme", subject: "lethe.v1.keybroker.policy.publish", reply: "_INBOX.tenant.acme.x", want: allowed},
		"tenant/keybroker release":            {role: natsauth.RoleTenant, name: "acme", subject: "lethe.v1.keybroker.release", want: violation},
		"tenant/JetStream API":                {role: natsauth.RoleTenant, name: "acme", subject: "$JS.API.STREAM.DELETE.KV_lethe-migrations", want: violation},
		"tenant/KV":                           {role: natsauth.RoleTenant, name: "acme", subject: "$KV.lethe-migrations.m1", want: violation},
		"tenant/KV rollup":                    {role: natsauth.RoleTenant, name: "acme", subject: "$KV.lethe-hosts.h1", header: rollup, data: hostRec("h1"), want: violation},
		"tenant/another tenant's inbox":       {role: natsauth.RoleTenant, name: "acme", subject: "_INBOX.tenant.globex.x", want: violation},
		"tenant/the broker's inbox":           {role: natsauth.RoleTenant, name: "acme", subject: "_INBOX.broker.x", want: violation},
		"tenant/an agent's heartbeat":         {role: natsauth.RoleTenant, name: "acme", subject: agentapi.HeartbeatSubject("h1"), data: hostRec("h1"), want: violation},
		"tenant/service discovery":            {role: natsauth.RoleTenant, name: "acme", subject: "$SRV.PING", want: violation},
		"tenant/broker, JetStream reply":      {role: natsauth.RoleTenant, name: "acme", subject: broker.TenantSubject("acme", broker.OpMigrationsList), reply: "$JS.API.STREAM.DELETE.KV_lethe-migrations", data: []byte("{malformed"), want: refused},
		"tenant/broker, KV reply":             {role: natsauth.RoleTenant, name: "acme", subject: broker.TenantSubject("acme", broker.OpMigrationsGet), reply: "$KV.lethe-guests.acme.web", data: []byte("{malformed"), want: refused},
		"tenant/broker, another tenant's box": {role: natsauth.RoleTenant, name: "acme", subject: broker.TenantSubject("acme", broker.OpMigrationsList), reply: "_INBOX.tenant.globex.x", want: refused},

		// An auditor: reading LETHE_AUDIT through JetStream's API, nothing else.
		"auditor/audit stream info":         {role: natsauth.RoleAuditor, subject: "$JS.LETHE.API.STREAM.INFO.LETHE_AUDIT", reply: "_INBOX.auditor.x", want: allowed},
		"auditor/publishes an audit record": {role: natsauth.RoleAuditor, subject: broker.AuditSubject(broker.AuditHostState), want: violation},
		"auditor/forges a keybroker record": {role: natsauth.RoleAuditor, subject: "lethe.v1.audit.keybroker.release", want: violation},
		"auditor/deletes the audit stream":  {role: natsauth.RoleAuditor, subject: "$JS.API.STREAM.DELETE.LETHE_AUDIT", want: violation},
		"auditor/purges the audit stream":   {role: natsauth.RoleAuditor, subject: "$JS.API.STREAM.PURGE.LETHE_AUDIT", want: violation},
		"auditor/purges it, imported":       {role: natsauth.RoleAuditor, subject: "$JS.LETHE.API.STREAM.PURGE.LETHE_AUDIT", want: violation},
		"auditor/deletes it, imported":      {role: natsauth.RoleAuditor, subject: "$JS.LETHE.API.STREAM.DELETE.LETHE_AUDIT", want: violation},
		"auditor/updates the audit stream":  {role: natsauth.RoleAuditor, subject: "$JS.API.STREAM.UPDATE.LETHE_AUDIT", want: violation},
		"auditor/deletes an audit record":   {role: natsauth.RoleAuditor, subject: "$JS.API.STREAM.MSG.DELETE.LETHE_AUDIT", want: violation},
		"auditor/reads the events stream":   {role: natsauth.RoleAuditor, subject: "$JS.API.CONSUMER.CREATE.LETHE_EVENTS.c1", want: violation},
		"auditor/events stream info":        {role: natsauth.RoleAuditor, subject: "$JS.API.STREAM.INFO.LETHE_EVENTS", want: violation},
		"auditor/events, imported":          {role: natsauth.RoleAuditor, subject: "$JS.LETHE.API.CONSUMER.CREATE.LETHE_EVENTS.c1", want: violation},
		"auditor/reads a bucket":            {role: natsauth.RoleAuditor, subject: "$JS.API.DIRECT.GET.KV_lethe-guests", want: violation},
		"auditor/writes a bucket":           {role: natsauth.RoleAuditor, subject: "$KV.lethe-hosts.h1", data: hostRec("h1"), want: violation},
		"auditor/lists streams":             {role: natsauth.RoleAuditor, subject: "$JS.API.STREAM.LIST", want: violation},
		"auditor/calls the broker":          {role: natsauth.RoleAuditor, subject: broker.OperatorSubject(broker.OpHostsList), want: violation},
		"auditor/calls the keybroker":       {role: natsauth.RoleAuditor, subject: "lethe.v1.keybroker.pubkey", want: violation},
		"auditor/calls an agent":            {role: natsauth.RoleAuditor, subject: agentapi.Subject("h1", agentapi.OpStatus), want: violation},
		"auditor/publishes an event":        {role: natsauth.RoleAuditor, subject: broker.EventsSubject("m1"), want: violation},
		"auditor/an operator's inbox":       {role: natsauth.RoleAuditor, subject: "_INBOX.operator.x", want: violation},
		"auditor/service discovery":         {role: natsauth.RoleAuditor, subject: "$SRV.PING", want: violation},

		// An agent: its own subjects, heartbeats through the broker, answers to calls made to it.
		"agent/own heartbeat":                 {role: natsauth.RoleAgent, name: "h1", subject: agentapi.HeartbeatSubject("h1"), reply: "_INBOX.agent.h1.x", data: hostRec("h1"), want: allowed},
		"agent/own progress":                  {role: natsauth.RoleAgent, name: "h1", subject: agentapi.ProgressSubject("h1", "m1"), want: allowed},
		"agent/answers a call made to it":     {role: natsauth.RoleAgent, name: "h1", subject: agentapi.ReplyPrefix("h1") + "x", want: allowed},
		"agent/another host's heartbeat":      {role: natsauth.RoleAgent, name: "h1", subject: agentapi.HeartbeatSubject("h2"), data: hostRec("h2"), want: violation},
		"agent/answers for another host":      {role: natsauth.RoleAgent, name: "h1", subject: agentapi.ReplyPrefix("h2") + "x", want: violation},
		"agent/the broker's inbox":            {role: natsauth.RoleAgent, name: "h1", subject: "_INBOX.broker.x", want: violation},
		"agent/a tenant's inbox":              {role: natsauth.RoleAgent, name: "h1", subject: "_INBOX.tenant.acme.x", want: violation},
		"agent/own host key":                  {role: natsauth.RoleAgent, name: "h1", subject: "$KV.lethe-hosts.h1", data: hostRec("h1"), want: violation},
		"agent/own host key, rollup":          {role: natsauth.RoleAgent, name: "h1", subject: "$KV.lethe-hosts.h1", header: rollup, data: hostRec("h1"), want: violation},
		"agent/purges the host bucket":        {role: natsauth.RoleAgent, name: "h1", subject: "$JS.API.STREAM.PURGE.KV_lethe-hosts", want: violation},
		"agent/calls the keybroker":           {role: natsauth.RoleAgent, name: "h1", subject: "lethe.v1.keybroker.release", want: violation},
		"agent/heartbeat, JetStream reply":    {role: natsauth.RoleAgent, name: "h1", subject: agentapi.HeartbeatSubject("h1"), reply: "$JS.API.STREAM.DELETE.KV_lethe-hosts", data: hostRec("h1"), want: refused},
		"agent/heartbeat, another host's box": {role: natsauth.RoleAgent, name: "h1", subject: agentapi.HeartbeatSubject("h1"), reply: "_INBOX.agent.h2.x", data: hostRec("h1"), want: refused},
	}
	h1 := e.agents["h1"]
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			nc, _ := connectAs(t, e, tc.role, tc.name)
			data := tc.data
			if data == nil {
				data = []byte(`{}`)
			}
			before := metrics.count("reply_refused")
			statusCalls := h1.CallCount(agentapi.OpStatus, "m1")
			msg := &nats.Msg{Subject: tc.subject, Reply: tc.reply, Header: tc.header, Data: data}
			if err := nc.PublishMsg(msg); err != nil {
				t.Fatal(err)
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			// A permission violation arrives before the answer to the flush.
			got := allowed
			if err := nc.LastError(); err != nil {
				if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), tc.subject) {
					t.Fatalf("got %v, want a permission violation on %s or none", err, tc.subject)
				}
				got = violation
			}
			if got == allowed && tc.want == refused {
				switch {
				case tc.role == natsauth.RoleBroker: // a call to agent h1: it answers a proper call after dropping this one
					if _, err := agentapi.NewClient(nc, 0).Status(t.Context(), "h1", &agentapi.StatusRequest{MigrationID: "m1"}); err != nil && !errors.Is(err, agentapi.ErrNotFound) {
						t.Fatal(err)
					}
					if n := h1.CallCount(agentapi.OpStatus, "m1"); n != statusCalls+1 {
						t.Fatalf("agent handled %d status calls, want only the proper one", n-statusCalls)
					}
					got = refused
				default:
					metrics.waitCount(t, "reply_refused", before+1)
					got = refused
				}
			}
			if got != tc.want {
				t.Errorf("%s on %s (reply %q): %s, want %s", tc.role, tc.subject, tc.reply, got, tc.want)
			}
		})
	}
	for _, s := range streams {
		if _, err := js.Stream(t.Context(), s); err != nil {
			t.Errorf("stream %s after the attempts: %v", s, err)
		}
	}
	hosts, err := e.operator().ListHosts(t.Context(), &broker.ListHostsRequest{All: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts.Hosts) != 2 {
		t.Errorf("%d host records after the attempts, want 2", len(hosts.Hosts))
	}
}

// TestHeartbeatNamesItsHost shows that the broker stores an agent's heartbeat only under the
// host whose subject it came on: an agent's record naming another host is refused.
func TestHeartbeatNamesItsHost(t *testing.T) {
	e := authEnv(t)
	e.standard()
	nc, _ := connectAs(t, e, natsauth.RoleAgent, "h1")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	before, err := e.kv(broker.HostsBucket).Get(ctx, "h2")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(agentapi.HostRecord{Host: "h2", Platform: attest.PlatformEmulatedSEVSNP, Heartbeat: time.Now()})
	msg, err := nc.RequestMsgWithContext(ctx, &nats.Msg{Subject: agentapi.HeartbeatSubject("h1"), Data: data})
	if err != nil {
		t.Fatal(err)
	}
	if msg.Header.Get("Nats-Service-Error-Code") != string(agentapi.CodeBadRequest) {
		t.Errorf("heartbeat of h1 naming h2: answer %q %v, want a bad_request error", msg.Data, msg.Header)
	}
	after, err := e.kv(broker.HostsBucket).Get(ctx, "h2")
	if err != nil {
		t.Fatal(err)
	}
	if after.Revision() != before.Revision() {
		t.Errorf("h2's record changed (revision %d → %d)", before.Revision(), after.Revision())
	}
}

// TestBrokerStoreServesNothing shows that the broker's JetStream user may subscribe to nothing
// but its own inbox: no request reaches it, so no caller can choose the subject it publishes
// on with JetStream's rights.
func TestBrokerStoreServesNothing(t *testing.T) {
	e := authEnv(t)
	for _, subject := range []string{
		broker.SubjectPrefix + ".>",
		agentapi.HeartbeatWildcard,
		agentapi.ProgressWildcard,
		"lethe.v1.keybroker.>",
		"$SRV.>",
		"_INBOX.broker.>",
		">",
	} {
		t.Run(subject, func(t *testing.T) {
			nc, errs := connectAs(t, e, natsauth.RoleBrokerStore, "")
			if _, err := nc.SubscribeSync(subject); err != nil {
				t.Fatal(err)
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-errs:
				if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), subject) {
					t.Fatalf("subscribing to %s: %v, want a permission violation", subject, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("subscribing to %s: no permission violation", subject)
			}
		})
	}
}
