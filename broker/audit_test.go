package broker_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
)

// TestAuditorReadsOperatorActions: a cordon, a drain and the keybroker's events reach stream
// LETHE_AUDIT as versioned records, which the auditor reads from the start with nats.go's
// ordered consumer; the auditor can neither subscribe to the audit subjects directly nor
// remove the stream.
func TestAuditorReadsOperatorActions(t *testing.T) {
	e := authEnv(t)
	e.standard()
	e.agents["h1"].AutoCommit = true
	ctx := t.Context()
	op := e.operator()
	if _, err := op.CordonHost(ctx, &broker.CordonRequest{Host: "h2", Reason: "firmware"}); err != nil {
		t.Fatal(err)
	}
	if _, err := op.UncordonHost(ctx, &broker.UncordonRequest{Host: "h2"}); err != nil {
		t.Fatal(err)
	}
	resp, err := op.Drain(ctx, &broker.DrainRequest{Host: "h1", Reason: "kernel update"})
	if err != nil {
		t.Fatal(err)
	}
	opID := resp.Operation.ID
	kb, _ := connectAs(t, e, natsauth.RoleKeybroker, "")
	if err := kb.Publish("lethe.v1.audit.keybroker.release", []byte(`{"schema":"lethe.audit/v1","kind":"release","decision":"deny"}`)); err != nil {
		t.Fatal(err)
	}

	auditor, errs := connectAs(t, e, natsauth.RoleAuditor, "")
	js, err := jetstream.NewWithAPIPrefix(auditor, natsauth.AuditorAPIPrefix)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.OrderedConsumer(ctx, broker.AuditStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	type seen struct{ Subject, Action, By, Target, State, Reason string }
	want := []seen{
		{"lethe.v1.audit.broker.policy-apply", "policy-apply", "tenant:" + tenant, tenant, "", ""},
		{"lethe.v1.audit.broker.guest-adopt", "guest-adopt", "tenant:" + tenant, broker.GuestKey(tenant, vm), "", ""},
		{"lethe.v1.audit.broker.host-state", "host-state", "operator", "h2", "cordoned", "firmware"},
		{"lethe.v1.audit.broker.host-state", "host-state", "operator", "h2", "schedulable", ""},
		{"lethe.v1.audit.broker.host-state", "host-state", "operator", "h1", "draining", "kernel update"},
		{"lethe.v1.audit.broker.fleet-start", "fleet-start", "operator", opID, "running", "kernel update"},
		{"lethe.v1.audit.keybroker.release", "", "", "", "", ""},
	}
	var got []seen
	deadline := time.Now().Add(20 * time.Second)
	finished := false
	for !finished || len(got) < len(want) {
		if time.Now().After(deadline) {
			t.Fatalf("audit records so far %+v; the drain's end not among them", got)
		}
		msg, err := cons.Next(jetstream.FetchMaxWait(time.Second))
		if errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, nats.ErrTimeout) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		var rec broker.AuditRecord
		if err := json.Unmarshal(msg.Data(), &rec); err != nil {
			t.Fatal(err)
		}
		if rec.Schema != broker.AuditSchema {
			t.Errorf("record on %s: schema %q, want %q", msg.Subject(), rec.Schema, broker.AuditSchema)
		}
		switch {
		case rec.Action == broker.AuditFleetFinish:
			if rec.Target != opID || rec.State != string(broker.FleetDone) || !strings.Contains(rec.Detail, "1 moved") {
				t.Errorf("end of the drain: %+v", rec)
			}
			finished = true
		case rec.Action == broker.AuditMigrationRequest, rec.Action == broker.AuditHostState && rec.Host == "h1" && rec.State != "draining":
			// the drain's migration and the host it leaves
		default:
			got = append(got, seen{msg.Subject(), string(rec.Action), rec.By, rec.Target, rec.State, rec.Reason})
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("audit records (-want +got):\n%s", diff)
	}

	// Its only subscription is its inbox: no reading the audit subjects around the stream.
	if _, err := auditor.SubscribeSync(natsauth.AuditSubjectPrefix + ".>"); err != nil {
		t.Fatal(err)
	}
	if err := auditor.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errs:
		if !errors.Is(err, nats.ErrPermissionViolation) {
			t.Errorf("subscribing to the audit subjects: %v, want a permission violation", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("subscribing to the audit subjects: no permission violation")
	}
	if err := js.DeleteStream(ctx, broker.AuditStream); err == nil {
		t.Error("the auditor deleted the audit stream")
	}
	// JetStream answers on the reply subject a request names; the auditor's answers stay in
	// its own account, so naming an audit subject adds nothing to the stream.
	stream, err := e.jetstream().Stream(ctx, broker.AuditStream)
	if err != nil {
		t.Fatalf("audit stream after the auditor's attempts: %v", err)
	}
	before := stream.CachedInfo().State.LastSeq
	for _, s := range []string{"STREAM.INFO.LETHE_AUDIT", "CONSUMER.MSG.NEXT.LETHE_AUDIT." + cons.CachedInfo().Name} {
		if err := auditor.PublishRequest(natsauth.AuditorAPIPrefix+"."+s, broker.AuditSubject(broker.AuditHostState), []byte(`{"batch":10}`)); err != nil {
			t.Fatal(err)
		}
	}
	if err := auditor.Flush(); err != nil {
		t.Fatal(err)
	}
	// A record published after the requests is stored after anything they could add.
	bk, _ := connectAs(t, e, natsauth.RoleBroker, "")
	if err := bk.Publish(broker.AuditSubject(broker.AuditHostState), []byte(`{"schema":"lethe.audit/v1"}`)); err != nil {
		t.Fatal(err)
	}
	// The first message stored after the requests must be that record.
	next, err := e.jetstream().OrderedConsumer(ctx, broker.AuditStream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: before + 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := next.Next(jetstream.FetchMaxWait(10 * time.Second))
	if err != nil {
		t.Fatalf("waiting for the broker's record: %v", err)
	}
	if string(msg.Data()) != `{"schema":"lethe.audit/v1"}` {
		t.Errorf("the stream stored %s after the auditor's requests, before the broker's record", msg.Data())
	}
}
