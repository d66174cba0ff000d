package natsrpc_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/internal/natsrpc"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/wireerr"
)

// These tests run against a real NATS server: testing/synctest does not fit network I/O, so
// the waits below are on channels the handlers close, never on sleeps.

const subject = "test.v1.echo"

type echo struct {
	Text string `json:"text"`
}

// callers is the inbox prefix the tests' clients use and the servers allow.
const callers = "_INBOX.caller."

// start serves h on subject with cfg's settings and stops the server at the end of the test.
func start(t *testing.T, cfg natsrpc.Config, h natsrpc.Handler) (*natsrpc.Server, *nats.Conn) {
	t.Helper()
	ns := natstest.Start(t, natstest.Options{})
	cfg.Conn = ns.Connect(t)
	cfg.Name = "test"
	cfg.Endpoints = []natsrpc.Endpoint{{Name: "echo", Subject: subject, Handler: h, Reply: natsrpc.ReplyPrefixes(callers)}}
	srv, err := natsrpc.Start(t.Context(), cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = srv.Stop() })
	return srv, ns.Connect(t, nats.CustomInboxPrefix(strings.TrimSuffix(callers, ".")))
}

func call(ctx context.Context, nc *nats.Conn, text string, opts ...natsrpc.CallOption) (*echo, error) {
	return natsrpc.Call[echo, echo](ctx, nc, subject, echo{Text: text}, opts...)
}

func TestRoundTrip(t *testing.T) {
	_, nc := start(t, natsrpc.Config{}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		return &echo{Text: "re: " + r.Text}, nil
	}))
	got, err := call(t.Context(), nc, "hi")
	if err != nil || got.Text != "re: hi" {
		t.Fatalf("call = %+v, %v; want re: hi", got, err)
	}
}

func TestErrors(t *testing.T) {
	const secret = "vault token hvs.SECRET at 10.0.0.1"
	_, nc := start(t, natsrpc.Config{}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		switch r.Text {
		case "denied":
			return nil, fmt.Errorf("releasing: %w", wireerr.New("denied", "rule a failed\nrule b failed"))
		case "internal":
			return nil, errors.New(secret)
		}
		return r, nil
	}))
	tests := map[string]struct {
		code    wireerr.Code
		message string
	}{
		"denied":   {"denied", "rule a failed rule b failed"},
		"internal": {wireerr.CodeInternal, "internal error"},
	}
	for text, want := range tests {
		_, err := call(t.Context(), nc, text)
		e, ok := errors.AsType[*wireerr.Error](err)
		if !ok {
			t.Errorf("%s: error %v is no *wireerr.Error", text, err)
			continue
		}
		if e.Code != want.code || e.Message != want.message || !errors.Is(err, want.code) {
			t.Errorf("%s: got %q %q, want %q %q", text, e.Code, e.Message, want.code, want.message)
		}
		if strings.Contains(err.Error(), "hvs.") {
			t.Errorf("%s: internal detail on the wire: %v", text, err)
		}
	}
	// A body that does not decode is the caller's fault, with the invalid-request code.
	msg, err := nc.Request(subject, []byte("{"), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := msg.Header.Get("Nats-Service-Error-Code"); got != string(natsrpc.DefaultInvalidCode) {
		t.Errorf("malformed request answered %q, want %q", got, natsrpc.DefaultInvalidCode)
	}
}

func TestPublicMapping(t *testing.T) {
	errMine := errors.New("mine")
	_, nc := start(t, natsrpc.Config{Public: func(err error) *wireerr.Error {
		if errors.Is(err, errMine) {
			return wireerr.New("mine", err.Error())
		}
		return nil
	}}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		if r.Text == "mine" {
			return nil, fmt.Errorf("doing: %w", errMine)
		}
		// Another API's error answer, wrapped: not this API's to answer with.
		return nil, fmt.Errorf("calling downstream: %w", wireerr.New("not_found", "downstream"))
	}))
	if _, err := call(t.Context(), nc, "mine"); !errors.Is(err, wireerr.Code("mine")) || !strings.Contains(err.Error(), "doing: mine") {
		t.Errorf("mapped error = %v, want code mine with its text", err)
	}
	if _, err := call(t.Context(), nc, "other"); !errors.Is(err, wireerr.CodeInternal) {
		t.Errorf("unmapped error = %v, want internal", err)
	}
}

func TestAdmissionLimit(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	_, nc := start(t, natsrpc.Config{MaxConcurrent: 1}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		if r.Text == "block" {
			close(entered)
			<-release
		}
		return r, nil
	}))
	first := make(chan error, 1)
	go func() {
		_, err := call(context.Background(), nc, "block")
		first <- err
	}()
	<-entered
	if _, err := call(t.Context(), nc, "second"); !errors.Is(err, natsrpc.DefaultBusyCode) {
		t.Errorf("second request at the limit = %v, want busy", err)
	}
	close(release)
	if err := <-first; err != nil {
		t.Errorf("first request: %v", err)
	}
	if _, err := call(t.Context(), nc, "third"); err != nil {
		t.Errorf("request below the limit again: %v", err)
	}
}

func TestDeadline(t *testing.T) {
	_, nc := start(t, natsrpc.Config{RequestTimeout: 50 * time.Millisecond}, natsrpc.Typed(func(ctx context.Context, _ *echo) (*echo, error) {
		<-ctx.Done()
		return &echo{Text: ctx.Err().Error()}, nil
	}))
	got, err := call(t.Context(), nc, "wait")
	if err != nil || got.Text != context.DeadlineExceeded.Error() {
		t.Errorf("handler's context ended with %+v, %v; want its deadline", got, err)
	}
}

func TestDrain(t *testing.T) {
	entered := make(chan struct{})
	var finished atomic.Bool
	var nc *nats.Conn
	srv, nc := start(t, natsrpc.Config{}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		if r.Text == "probe" {
			return r, nil
		}
		close(entered)
		// Finish only once Stop is under way: the server no longer takes requests.
		for {
			_, err := call(context.Background(), nc, "probe", natsrpc.WithTimeout(time.Second))
			if errors.Is(err, natsrpc.DefaultBusyCode) || errors.Is(err, natsrpc.ErrNoAnswer) {
				break
			}
		}
		finished.Store(true)
		return r, nil
	}))
	answer := make(chan error, 1)
	go func() {
		_, err := call(context.Background(), nc, "in flight")
		answer <- err
	}()
	<-entered
	if err := srv.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if !finished.Load() {
		t.Error("Stop returned before the request in progress finished")
	}
	if err := <-answer; err != nil {
		t.Errorf("request in progress at Stop: %v, want its answer", err)
	}
	if _, err := call(t.Context(), nc, "after", natsrpc.WithTimeout(time.Second)); !errors.Is(err, natsrpc.ErrNoAnswer) {
		t.Errorf("request after Stop = %v, want no answer", err)
	}
}

func TestDrainBound(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	srv, nc := start(t, natsrpc.Config{DrainTimeout: 50 * time.Millisecond}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		close(entered)
		<-release
		return r, nil
	}))
	go func() { _, _ = call(context.Background(), nc, "stuck", natsrpc.WithTimeout(5*time.Second)) }()
	<-entered
	if err := srv.Stop(); err == nil || !strings.Contains(err.Error(), "still running") {
		t.Errorf("Stop with a stuck handler = %v, want an error after the drain bound", err)
	}
}

func TestRefusesForeignReply(t *testing.T) {
	var handled atomic.Int32
	refused := make(chan string, 4)
	ns := natstest.Start(t, natstest.Options{})
	srv, err := natsrpc.Start(t.Context(), natsrpc.Config{
		Conn: ns.Connect(t), Name: "test",
		Endpoints: []natsrpc.Endpoint{{Name: "echo", Subject: subject, Reply: natsrpc.ReplyPrefixes(callers),
			Handler: func(context.Context, *natsrpc.Request) (any, error) { handled.Add(1); return echo{}, nil }}},
		Refused: func(_, reply string) { refused <- reply },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Stop() })
	nc := ns.Connect(t)
	victim, err := nc.SubscribeSync("victim.>")
	if err != nil {
		t.Fatal(err)
	}
	for _, reply := range []string{"victim.x", "_INBOX.callerx.y"} {
		if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: reply, Data: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
		if got := <-refused; got != reply {
			t.Errorf("refused %q, want %q", got, reply)
		}
	}
	// An allowed reply subject is answered, after the refused ones: the victim got nothing.
	ok := nats.NewInbox()
	ok = callers + ok[strings.LastIndex(ok, ".")+1:]
	sub, err := nc.SubscribeSync(ok)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: ok, Data: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(10 * time.Second); err != nil {
		t.Fatalf("allowed reply: %v", err)
	}
	if n, _, _ := victim.Pending(); n != 0 || handled.Load() != 1 {
		t.Errorf("%d messages on the victim's subject, %d requests handled; want 0 and 1", n, handled.Load())
	}
}

func TestCallLimits(t *testing.T) {
	_, nc := start(t, natsrpc.Config{}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) {
		return &echo{Text: strings.Repeat("x", 4096)}, nil
	}))
	if _, err := call(t.Context(), nc, "big", natsrpc.WithMaxResponse(1024)); !errors.Is(err, natsrpc.ErrResponseTooLarge) {
		t.Errorf("oversize response = %v, want ErrResponseTooLarge", err)
	}
	if _, err := natsrpc.Call[echo, echo](t.Context(), nc, "test.v1.nobody", echo{}); !errors.Is(err, natsrpc.ErrNoAnswer) || !errors.Is(err, nats.ErrNoResponders) {
		t.Errorf("call nobody serves = %v, want ErrNoAnswer and nats.ErrNoResponders", err)
	}
}

func TestCallReplyPrefix(t *testing.T) {
	_, nc := start(t, natsrpc.Config{}, natsrpc.Typed(func(_ context.Context, r *echo) (*echo, error) { return r, nil }))
	if got, err := call(t.Context(), nc, "hi", natsrpc.WithReplyPrefix(callers+"host1.")); err != nil || got.Text != "hi" {
		t.Errorf("call under a reply prefix = %+v, %v", got, err)
	}
	// A reply prefix the server does not allow gets no answer at all.
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, err := call(ctx, nc, "hi", natsrpc.WithReplyPrefix("_INBOX.other.")); !errors.Is(err, natsrpc.ErrNoAnswer) {
		t.Errorf("call under a foreign reply prefix = %v, want no answer", err)
	}
}
