package trace

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

func TestOneTracePerMigration(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	// Two processes, one migration: the broker's phase and the keybroker's release.
	broker, keybroker := NewTracer(tp, "broker"), NewTracer(tp, "keybroker")
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	broker.Phase(t.Context(), "m-1", "Attesting", start, start.Add(time.Second), "")
	keybroker.Start(context.Background(), "m-1", "release").End(errors.New("denied"))
	broker.Phase(t.Context(), "m-2", "Attesting", start, start.Add(time.Second), "")

	spans := exp.GetSpans()
	if len(spans) != 3 {
		t.Fatalf("%d spans, want 3", len(spans))
	}
	if spans[0].SpanContext.TraceID() != spans[1].SpanContext.TraceID() || spans[0].Parent.SpanID() != spans[1].Parent.SpanID() {
		t.Error("the two processes' spans of one migration are in different traces or under different parents")
	}
	if spans[0].SpanContext.TraceID() == spans[2].SpanContext.TraceID() {
		t.Error("two migrations share a trace")
	}
	if got := spans[0].SpanContext.TraceID().String(); got != TraceID("m-1") {
		t.Errorf("trace id %s, want TraceID(m-1) %s", got, TraceID("m-1"))
	}
	if !spans[0].StartTime.Equal(start) || !spans[0].EndTime.Equal(start.Add(time.Second)) {
		t.Errorf("phase span from %s to %s, want the phase's times", spans[0].StartTime, spans[0].EndTime)
	}
	if spans[1].Status.Code != codes.Error || spans[1].Status.Description != "denied" {
		t.Errorf("release span status %+v, want the error", spans[1].Status)
	}
}

func TestNewProviderNeedsEndpoint(t *testing.T) {
	if _, err := NewProvider(t.Context(), Config{Service: "lethe-broker"}); err == nil {
		t.Error("NewProvider accepted no endpoint")
	}
	p, err := NewProvider(t.Context(), Config{Endpoint: "http://127.0.0.1:4318", Service: "lethe-broker"})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Shutdown(t.Context()); err != nil {
		t.Error(err)
	}
}
