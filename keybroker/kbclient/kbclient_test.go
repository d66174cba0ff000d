package kbclient_test

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

func TestClient(t *testing.T) {
	srv := natstest.Start(t, natstest.Options{})
	nc := srv.Connect(t)
	answer := func(op string, f func(*nats.Msg)) {
		t.Helper()
		sub, err := nc.Subscribe(kbwire.SubjectPrefix+"."+op, f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sub.Unsubscribe() })
	}
	answer(kbwire.OpPublicKey, func(m *nats.Msg) { m.Respond([]byte(`{"pem":"PEM"}`)) })
	answer(kbwire.OpTenantRotateKey, func(m *nats.Msg) {
		r := nats.NewMsg(m.Reply)
		r.Header.Set(micro.ErrorCodeHeader, "unauthorized")
		r.Header.Set(micro.ErrorHeader, "not signed by the current key")
		m.RespondMsg(r)
	})
	answer(kbwire.OpLogConsistency, func(m *nats.Msg) { m.Respond([]byte(`{"proof":["AQI="]}`)) })
	c := kbclient.New(nc, time.Second)

	pem, err := c.PublicKeyPEM(t.Context())
	if err != nil || string(pem) != "PEM" {
		t.Errorf("PublicKeyPEM = %q, %v; want PEM", pem, err)
	}
	_, err = c.RotateKey(t.Context(), []byte("signed"))
	e, ok := errors.AsType[*wireerr.Error](err)
	if !ok || !errors.Is(err, kbwire.CodeUnauthorized) {
		t.Fatalf("RotateKey: %v, want a *wireerr.Error matching kbwire.CodeUnauthorized", err)
	}
	if diff := cmp.Diff(&wireerr.Error{Code: kbwire.CodeUnauthorized, Message: "not signed by the current key"}, e); diff != "" {
		t.Errorf("RotateKey error (-want +got):\n%s", diff)
	}
	proof, err := c.LogConsistency(t.Context(), 1, 2)
	if diff := cmp.Diff([][]byte{{1, 2}}, proof); diff != "" || err != nil {
		t.Errorf("LogConsistency: %v (-want +got):\n%s", err, diff)
	}
	if _, err := c.LogHistory(t.Context(), "acme", "web", false); !errors.Is(err, kbclient.ErrNoKeybroker) {
		t.Errorf("LogHistory with no keybroker: %v, want ErrNoKeybroker", err)
	}
	if _, err := c.Receipt(t.Context(), "m1", false); !errors.Is(err, kbclient.ErrNoKeybroker) {
		t.Errorf("Receipt with no keybroker: %v, want ErrNoKeybroker", err)
	}
}
