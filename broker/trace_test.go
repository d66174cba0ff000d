package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/trace"
)

// TestTraceSpanPerPhase checks that a migration is one trace, whose id every process derives
// from the migration id, with a span per phase in order.
func TestTraceSpanPerPhase(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	ended := &endedSpans{spans: make(chan struct{}, 64)}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithSpanProcessor(ended))
	e := newEnv(t, natstest.Options{})
	e.cfg.Tracer = trace.NewTracer(tp, "github.com/lethe-cc/lethe/broker")
	e.standard()
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
	want := []string{"Requested", "Attesting", "KeysReleased", "Transferring", "CuttingOver", "Committed", "Erased"}
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

// endedSpans is a span processor that signals every span ended.
type endedSpans struct{ spans chan struct{} }

func (p *endedSpans) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (p *endedSpans) OnEnd(sdktrace.ReadOnlySpan)                     { p.spans <- struct{}{} }
func (p *endedSpans) Shutdown(context.Context) error                  { return nil }
func (p *endedSpans) ForceFlush(context.Context) error                { return nil }
