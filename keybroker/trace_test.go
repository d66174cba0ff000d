package keybroker

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	otelcodes "go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/lethe-cc/lethe/internal/trace"
)

// TestTraceReleaseAndCommit checks that a release and the commit's destruction are spans of the
// migration's trace, and that a denial is a failed span naming its code, not its message.
func TestTraceReleaseAndCommit(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	e := newEnv(t, func(c *Config) { c.Tracer = trace.NewTracer(tp, "keybroker") })
	ctx := t.Context()
	e.adopt("vm1")
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	rel, err := e.kb.Release(ctx, m.req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.Destroy(ctx, e.commit(m, rel)); err != nil {
		t.Fatal(err)
	}
	_, denied := e.kb.Release(ctx, e.newMigration("m2", "vm-unknown", "destination", e.signedPolicy(1, nil)).req)
	if denied == nil {
		t.Fatal("release of an unknown guest succeeded")
	}

	type span struct{ Name, Trace, Status string }
	var got []span
	for _, s := range exp.GetSpans() {
		st := ""
		if s.Status.Code == otelcodes.Error {
			st = s.Status.Description
		}
		got = append(got, span{s.Name, s.SpanContext.TraceID().String(), st})
	}
	want := []span{
		{"keybroker.release", trace.TraceID("m1"), ""},
		{"keybroker.commit", trace.TraceID("m1"), ""},
		{"keybroker.release", trace.TraceID("m2"), ErrorCode(denied)},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("spans (-want +got):\n%s", diff)
	}
}
