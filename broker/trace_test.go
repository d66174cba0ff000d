package broker_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/trace"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// newTracedEnv is the standard env with a tracer whose spans go to exp, each signalled on
// ended as it ends.
func newTracedEnv(t *testing.T) (*env, *tracetest.InMemoryExporter, *endedSpans) {
	exp := tracetest.NewInMemoryExporter()
	ended := &endedSpans{spans: make(chan struct{}, 64)}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithSpanProcessor(ended))
	e := newEnv(t, natstest.Options{})
	e.cfg.Tracer = trace.NewTracer(tp, "github.com/lethe-cc/lethe/broker")
	e.standard()
	return e, exp, ended
}

// TestTraceSpanPerPhase checks that a migration is one trace, whose id every process derives
// from the migration id, with a span per phase in order, and the source agent's rounds and
// pause recorded as the migration commits.
func TestTraceSpanPerPhase(t *testing.T) {
	e, exp, ended := newTracedEnv(t)
	e.agents["h1"].AutoCommit = true

	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	// The broker ends a phase's span after it writes the phase: the record may be read
	// before the span of its last phase is ended.
	want := []string{"Requested", "Attesting", "KeysReleased", "Transferring", "CuttingOver",
		"agent round 1", "agent final round", "agent cutover pause", "Committed", "Erased"}
	for range want {
		select {
		case <-ended.spans:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d spans ended, want %d", len(exp.GetSpans()), len(want))
		}
	}

	var names []string
	traces := map[string]bool{}
	for _, s := range exp.GetSpans() {
		traces[s.SpanContext.TraceID().String()] = true
		names = append(names, s.Name)
		if s.EndTime.Before(s.StartTime) {
			t.Errorf("span %s ends before it starts", s.Name)
		}
	}
	if diff := cmp.Diff(want, names); diff != "" {
		t.Errorf("spans (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(map[string]bool{trace.TraceID(id): true}, traces); diff != "" {
		t.Errorf("trace ids (-want +got):\n%s", diff)
	}
}

// TestTraceAgentTransfer checks that the source agent's committed report becomes a span per
// round and one for the pause in the migration's trace, laid out backwards from the report's
// time, with what the report says of them and nothing of its acknowledgement or digest.
func TestTraceAgentTransfer(t *testing.T) {
	e, exp, ended := newTracedEnv(t)

	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Migration.ID
	e.waitMigration(id, func(m *broker.Migration) bool { return m.Phase == broker.PhaseTransferring && m.Progress != nil })
	reported := e.clock.Now() // the fake agent stamps its reports with the test's clock
	committed := agentapi.Progress{
		Phase: agentapi.TransferCommitted, Bytes: 3 << 20, Pages: 770, TotalBytes: 1 << 20, Round: 3,
		Rounds: []agentapi.RoundStats{
			{Round: 1, Pages: 256, Bytes: 1 << 20, DirtyRate: 8192, Throughput: 1 << 30, Duration: 40 * time.Millisecond},
			{Round: 2, Pages: 512, Bytes: 2 << 20, DirtyRate: 4096, Throughput: 1 << 28, Duration: 10 * time.Millisecond, Throttle: 20},
			{Round: 3, Final: true, Pages: 2, Bytes: 8192, Throughput: 1 << 22, Duration: 2 * time.Millisecond},
		},
		Downtime: 5 * time.Millisecond, DowntimeSource: agentapi.DowntimeHypervisor, PostCopy: true,
		CommitAck: []byte("fake-commit-ack"), MemoryDigest: []byte("fake-memory-digest"),
	}
	if err := e.agents["h1"].Report(id, committed); err != nil {
		t.Fatal(err)
	}
	if m := e.waitMigration(id, inPhase(broker.PhaseErased, broker.PhaseAborted)); m.Phase != broker.PhaseErased {
		t.Fatalf("phase = %s (reason %q), want Erased", m.Phase, m.AbortReason)
	}
	// Seven phases and four spans of the agent's.
	for range 11 {
		select {
		case <-ended.spans:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d spans ended, want 11", len(exp.GetSpans()))
		}
	}

	type span struct {
		Name, Trace string
		Start, End  time.Time
		Attrs       map[string]any
	}
	var got []span
	for _, s := range exp.GetSpans() {
		if !strings.HasPrefix(s.Name, "agent ") {
			continue
		}
		attrs := map[string]any{}
		for _, a := range s.Attributes {
			attrs[string(a.Key)] = a.Value.AsInterface()
		}
		got = append(got, span{s.Name, s.SpanContext.TraceID().String(), s.StartTime, s.EndTime, attrs})
	}
	round := func(n int, final bool, pages, bytes int64, dirty, throughput float64, throttle int) map[string]any {
		return map[string]any{
			trace.AttrMigration: id, "lethe.source": "h1", "lethe.round": int64(n), "lethe.final": final,
			"lethe.pages": pages, "lethe.bytes": bytes, "lethe.dirty_rate": dirty, "lethe.throughput": throughput,
			"lethe.throttle": int64(throttle),
		}
	}
	ms := time.Millisecond
	want := []span{
		{"agent round 1", trace.TraceID(id), reported.Add(-52 * ms), reported.Add(-12 * ms), round(1, false, 256, 1<<20, 8192, 1<<30, 0)},
		{"agent round 2", trace.TraceID(id), reported.Add(-12 * ms), reported.Add(-2 * ms), round(2, false, 512, 2<<20, 4096, 1<<28, 20)},
		{"agent final round", trace.TraceID(id), reported.Add(-2 * ms), reported, round(3, true, 2, 8192, 0, 1<<22, 0)},
		{"agent cutover pause", trace.TraceID(id), reported.Add(-5 * ms), reported, map[string]any{
			trace.AttrMigration: id, "lethe.source": "h1",
			"lethe.downtime_source": agentapi.DowntimeHypervisor, "lethe.post_copy": true,
		}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("agent spans (-want +got):\n%s", diff)
	}
}

// TestTraceOff checks that a broker without a tracer records nothing, not even through the
// process's global tracer provider.
func TestTraceOff(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	t.Cleanup(func() {
		otel.SetTracerProvider(prev)
		_ = tp.Shutdown(context.Background())
	})
	e := newEnv(t, natstest.Options{})
	e.standard()
	e.agents["h1"].AutoCommit = true

	resp, err := e.tenant(tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: vm, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	m := e.waitMigration(resp.Migration.ID, inPhase(broker.PhaseErased, broker.PhaseAborted))
	if m.Phase != broker.PhaseErased || len(m.Rounds) == 0 {
		t.Fatalf("phase = %s (reason %q), %d rounds; want Erased with the agent's rounds", m.Phase, m.AbortReason, len(m.Rounds))
	}
	if spans := exp.GetSpans(); len(spans) != 0 {
		t.Errorf("%d spans recorded with tracing off, the first %s", len(spans), spans[0].Name)
	}
}

// endedSpans is a span processor that signals every span ended.
type endedSpans struct{ spans chan struct{} }

func (p *endedSpans) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (p *endedSpans) OnEnd(sdktrace.ReadOnlySpan)                     { p.spans <- struct{}{} }
func (p *endedSpans) Shutdown(context.Context) error                  { return nil }
func (p *endedSpans) ForceFlush(context.Context) error                { return nil }
