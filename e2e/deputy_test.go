package e2e

import (
	"errors"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Confused deputies: each scenario speaks as one role, with that role's real NATS user, and
// tries to make a server publish, with the server's own permissions, on a subject of its
// choosing (a JetStream API subject that deletes a stream), or to wipe the host records. Every
// request must be refused, and every stream and bucket still be there.
var deputyScenarios = []scenario{
	{"deputy/tenant-makes-the-broker-delete-streams", tenantDeputy},
	{"deputy/broker-user-makes-the-keybroker-delete-streams", keybrokerDeputy},
	{"deputy/broker-user-makes-an-agent-delete-streams", agentDeputy},
	{"deputy/agent-purges-the-host-bucket-with-a-rollup", agentRollup},
}

// TestDeputyScenarios runs deputyScenarios until they join TestE2E.

// lethesStreams are the streams behind Lethe's buckets and its events stream.
var lethesStreams = []string{
	"KV_" + broker.MigrationsBucket, "KV_" + broker.GuestsBucket, "KV_" + broker.PoliciesBucket,
	"KV_" + broker.ReceiptsBucket, "KV_" + broker.HostsBucket, broker.EventsStream,
}

// requireStreams fails the scenario if one of Lethe's streams is gone.
func (s *scn) requireStreams() {
	s.t.Helper()
	for _, name := range lethesStreams {
		if _, err := s.js.Stream(s.t.Context(), name); err != nil {
			s.t.Fatalf("stream %s after the attack: %v", name, err)
		}
	}
}

// sendDeputyRequests publishes on subject, as nc, a malformed request for each stream whose
// reply subject would delete that stream.
func (s *scn) sendDeputyRequests(nc *nats.Conn, subject string) {
	s.t.Helper()
	for _, name := range lethesStreams {
		m := &nats.Msg{Subject: subject, Reply: "$JS.API.STREAM.DELETE." + name, Data: []byte("{malformed")}
		if err := nc.PublishMsg(m); err != nil {
			s.t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		s.t.Fatal(err)
	}
}

// tenantDeputy: a tenant sends malformed requests to its own broker subjects whose reply
// subjects delete every stream; the broker's error replies would run with its JetStream rights.
func tenantDeputy(s *scn) {
	nc := s.connect("tenant-"+otherTenant, natsauth.InboxPrefix(natsauth.RoleTenant, otherTenant))
	for _, op := range broker.Ops {
		s.sendDeputyRequests(nc, broker.TenantSubject(otherTenant, op))
	}
	// The broker answers a proper request after the malformed ones.
	if _, err := s.other.ListMigrations(s.t.Context(), &broker.ListMigrationsRequest{}); err != nil {
		s.t.Fatal(err)
	}
	s.requireStreams()
	s.outcome = "refused: the broker dropped every request with a JetStream reply subject; every stream is there"
}

// keybrokerDeputy: the broker's user (the keybroker's main caller; operators, the other, are
// confined to tenant.register) sends requests whose reply subjects delete every stream.
func keybrokerDeputy(s *scn) {
	for _, op := range []string{"nonce", "release", "destroy", "receipt", "public_key", "tenant.register"} {
		s.sendDeputyRequests(s.conn, kbwire.SubjectPrefix+"."+op)
	}
	// The keybroker answers a proper request after them.
	if _, err := s.kbc.Nonce(s.t.Context(), &kbwire.NonceRequest{MigrationID: "deputy-probe", Role: attest.RoleSource}); err != nil {
		s.t.Fatal(err)
	}
	s.requireStreams()
	s.outcome = "refused: the keybroker dropped every request with a JetStream reply subject; every stream is there"
}

// agentDeputy: the broker's user calls an agent with reply subjects that delete every stream,
// and with the reply subject reserved for another host.
func agentDeputy(s *scn) {
	a, b := s.agent(snp(snpBase)), s.agent(snp(snpBase))
	for _, op := range agentapi.Ops {
		s.sendDeputyRequests(s.conn, agentapi.Subject(a.host, op))
	}
	inbox := agentapi.ReplyPrefix(b.host) + "deputy"
	sub, err := s.conn.SubscribeSync(inbox)
	if err != nil {
		s.t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := s.conn.PublishMsg(&nats.Msg{Subject: agentapi.Subject(a.host, agentapi.OpStatus), Reply: inbox, Data: []byte(`{"migrationId":"x"}`)}); err != nil {
		s.t.Fatal(err)
	}
	// The agent answers a proper call after them; the call with host b's reply got nothing.
	if _, err := s.agents.Status(s.t.Context(), a.host, &agentapi.StatusRequest{MigrationID: "deputy-probe"}); err != nil && !errors.Is(err, agentapi.ErrNotFound) {
		s.t.Fatal(err)
	}
	if m, err := sub.NextMsg(500 * time.Millisecond); err == nil {
		s.t.Fatalf("host %s answered on host %s's reply subject: %q", a.host, b.host, m.Data)
	}
	s.requireStreams()
	s.outcome = "refused: the agent dropped every request with a reply subject not reserved for it; every stream is there"
}

// agentRollup: an agent publishes on its own host key with a Nats-Rollup header (which would
// purge every other key of the bucket), and asks JetStream to purge the bucket.
func agentRollup(s *scn) {
	a, b := s.agent(snp(snpBase)), s.agent(snp(snpBase))
	nc, _ := s.connectAsAgent(s.t, b)
	attempts := []*nats.Msg{
		{Subject: "$KV." + broker.HostsBucket + "." + b.host, Header: nats.Header{"Nats-Rollup": []string{"all"}}, Data: []byte(`{}`)},
		{Subject: "$JS.API.STREAM.PURGE.KV_" + broker.HostsBucket, Data: []byte(`{}`)},
	}
	for _, m := range attempts {
		if err := nc.PublishMsg(m); err != nil {
			s.t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			s.t.Fatal(err)
		}
		if err := nc.LastError(); err == nil || !strings.Contains(strings.ToLower(err.Error()), "permission") || !strings.Contains(err.Error(), m.Subject) {
			s.t.Fatalf("agent %s publishing on %s: %v, want a permission violation", b.host, m.Subject, err)
		}
	}
	for _, h := range []string{a.host, b.host} {
		if _, ok, err := getKV[agentapi.HostRecord](s.t.Context(), s.js, broker.HostsBucket, h); err != nil || !ok {
			s.t.Fatalf("host record of %s after the roll-up: present %v, %v", h, ok, err)
		}
	}
	s.requireStreams()
	s.outcome = "refused: permission violations; every host record is there"
}
