package natsapi_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
)

// TestRefusesForeignReplySubjects sends every operation with a reply subject outside the
// callers' inboxes (JetStream's API, another user's inbox): the service drops each, unhandled
// and unanswered, counts it, and the stream the reply would have deleted is still there.
func TestRefusesForeignReplySubjects(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	nc := ns.Connect(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: "VICTIM", Subjects: []string{"victim.>"}}); err != nil {
		t.Fatal(err)
	}
	// No request reaches the core: a zero Keybroker would fail any that did.
	svc, err := natsapi.New(natsapi.Config{Conn: ns.Connect(t), Keybroker: new(keybroker.Keybroker)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	<-svc.Started()
	replies := []string{"$JS.API.STREAM.DELETE.VICTIM", "$KV.lethe-hosts.h1", "_INBOX.tenant.acme.x", "_INBOX.agent.h1.x", "_INBOX.brokerx.y", ""}
	for _, op := range natsapi.Ops {
		for _, reply := range replies {
			if err := nc.PublishMsg(&nats.Msg{Subject: natsapi.Subject(op), Reply: reply, Data: []byte("{malformed")}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A tenant's inbox is refused for every operation but the seven tenants call (publishing
	// policies, rotating keys, the public key, the residency log's four).
	want := uint64(len(natsapi.Ops)*len(replies) - 7)
	deadline := time.Now().Add(10 * time.Second)
	for svc.RefusedReplies() < want {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests refused, want %d", svc.RefusedReplies(), want)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := js.Stream(t.Context(), "VICTIM"); err != nil {
		t.Errorf("stream after the requests: %v", err)
	}
	if _, err := natsapi.New(natsapi.Config{Conn: nc, Keybroker: new(keybroker.Keybroker), ReplyPrefixes: []string{"_INBOX.broker"}}); err == nil {
		t.Error("a reply prefix without its final dot accepted")
	}
}
