package natsapi_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
)

// TestAuditPublished: a release and a denial each publish their audit event, with the schema
// version, on the keybroker's audit subject of its kind.
func TestAuditPublished(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	nc := e.ns.Connect(t)
	sub, err := nc.SubscribeSync("lethe.v1.audit.keybroker.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	e.adopt("vm1")
	if _, err := e.kbc.Release(ctx, e.newMigration("m1", "vm1", "destination").req); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if _, err := e.kbc.Release(ctx, e.newMigration("m2", "vm1", "weak").req); err == nil {
		t.Fatal("release to a platform the policy refuses: allowed")
	}

	type seen struct {
		Subject, Schema, Migration string
		Kind                       keybroker.EventKind
		Decision                   keybroker.Decision
		Reasons                    bool
	}
	var got []seen
	for range 3 {
		msg, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("audit events so far %+v: %v", got, err)
		}
		var ev keybroker.Event
		if err := json.Unmarshal(msg.Data, &ev); err != nil {
			t.Fatal(err)
		}
		got = append(got, seen{msg.Subject, ev.Schema, ev.MigrationID, ev.Kind, ev.Decision, len(ev.Reasons) > 0})
	}
	want := []seen{
		{natsapi.AuditSubject(keybroker.EventAdopt), keybroker.AuditSchema, got[0].Migration, keybroker.EventAdopt, keybroker.DecisionAllow, false},
		{"lethe.v1.audit.keybroker.release", "lethe.audit/v1", "m1", keybroker.EventRelease, keybroker.DecisionAllow, false},
		{"lethe.v1.audit.keybroker.release", "lethe.audit/v1", "m2", keybroker.EventRelease, keybroker.DecisionDeny, true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("audit events (-want +got):\n%s", diff)
	}
	if n := e.auditFailed.Load(); n != 0 {
		t.Errorf("%d audit events not published", n)
	}
}
