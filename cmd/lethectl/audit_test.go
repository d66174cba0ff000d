package main

import (
	"bufio"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
)

// TestAuditTail: (on a server without authentication, where the API has no prefix) the
// broker's records of a policy, an adoption and a cordon come out of
// LETHE_AUDIT oldest first, as text and as JSON lines; a message that is not a record is
// skipped and counted.
func TestAuditTail(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web")
	f.addHost("h2", 120)
	if _, errOut, code := f.run("hosts", "cordon", "h2", "--reason", "firmware update"); code != 0 {
		t.Fatalf("cordon: exit %d: %s", code, errOut)
	}
	nc := f.connect(natsauth.RoleKeybroker, "")
	if err := nc.Publish("lethe.v1.audit.broker.host-state", []byte(`{"type":"io.nats.jetstream.api.v1.stream_info_response"}`)); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	want := []string{
		"broker/policy-apply", "broker/guest-adopt", "broker/policy-apply",
		`broker/host-state            by=operator target=h2 host=h2 state=cordoned reason="firmware update"`,
	}
	// The broker publishes its records on its own connection as it answers: wait until the
	// stream holds all five messages (four records and the one that is not).
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := js.OrderedConsumer(t.Context(), broker.AuditStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range len(want) + 1 {
		if _, err := stored.Next(jetstream.FetchMaxWait(10 * time.Second)); err != nil {
			t.Fatalf("waiting for audit message %d in the stream: %v", i+1, err)
		}
	}
	out, errOut, code := f.run("audit", "tail", "--js-api-prefix", "$JS.API")
	if code != 0 {
		t.Fatalf("audit tail: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(want) {
		t.Fatalf("audit tail printed %d records, want %d:\n%s", len(lines), len(want), out)
	}
	for i, w := range want {
		if !strings.Contains(lines[i], w) {
			t.Errorf("record %d: %q, want it to contain %q", i, lines[i], w)
		}
	}
	if !strings.Contains(errOut, "1 messages on audit subjects were not audit records") {
		t.Errorf("audit tail's standard error %q does not count the message that is not a record", errOut)
	}

	out, _, code = f.run("audit", "tail", "--js-api-prefix", "$JS.API", "--since", "1h", "-o", "json")
	if code != 0 {
		t.Fatalf("audit tail -o json: exit %d", code)
	}
	var subjects []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var line struct {
			Seq     uint64
			Subject string
			Record  struct{ Schema, Action string }
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("%q: %v", sc.Text(), err)
		}
		if line.Seq == 0 || line.Record.Schema != "lethe.audit/v1" || !strings.HasSuffix(line.Subject, "."+line.Record.Action) {
			t.Errorf("JSON line %s", sc.Text())
		}
		subjects = append(subjects, line.Subject)
	}
	if len(subjects) != 4 {
		t.Errorf("audit tail -o json: subjects %v, want 4", subjects)
	}
}
