// Package trace records a migration as one OpenTelemetry trace across the processes that take
// part in it: a span per phase in the broker, spans for the keybroker's release, destruction
// and abort, and spans for the source agent's pre-copy rounds and pause, which the broker
// records from the agent's committed report.
//
// # One trace per migration, without propagation
//
// Every process derives the migration's trace from its id: the trace id is the first 16 bytes
// of SHA-256("lethe/v1/trace" ‖ migration id), and every span is a child of a remote parent
// whose span id is derived the same way (MigrationContext). So the broker and every keybroker
// join the same trace without a trace context crossing NATS: no wire message changes, and no
// process has to trust a traceparent another one sent. The parent span is never exported;
// a tracing backend shows the phases as the roots of the trace, grouped by its id. Trace ids
// say nothing about a migration that its id does not: they are a hash of it.
//
// Tracing is off unless a daemon is given an OTLP endpoint (NewProvider); a nil *Tracer
// records nothing, so callers need no check. Spans carry names, phases, hosts, outcomes, error
// codes and the sizes, rates and durations of the agent's rounds only: never a key, a sealed
// blob, a token, a MAC, a digest or evidence.
//
// The agent links none of this (cmd/lethe-agent's deps test forbids it): it runs inside the
// host's TEE, where every linked package is attack surface, and it exports nothing. Its rounds
// and pause are spans the broker records from the report the agent already sends, timed by
// the agent's clock and placed by working back from the report's time, so approximately.
package trace

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	oteltrace "go.opentelemetry.io/otel/trace"
)

// AttrMigration is the attribute naming a span's migration.
const AttrMigration = "lethe.migration"

// Config configures a Provider.
type Config struct {
	// Endpoint is the OTLP/HTTP collector, host:port or a URL (http:// for no TLS). Required.
	Endpoint string
	// Service is the service.name of the spans, the daemon's name. Required.
	Service string
	// Version is the service.version; empty means none.
	Version string
}

// Provider exports the spans of one daemon over OTLP/HTTP in batches.
type Provider struct {
	tp *sdktrace.TracerProvider
}

// NewProvider returns a provider exporting to cfg.Endpoint. It does not connect: an
// unreachable collector costs dropped spans, never a failed migration.
func NewProvider(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.Endpoint == "" || cfg.Service == "" {
		return nil, errors.New("tracing: endpoint and service are required")
	}
	opt := otlptracehttp.WithEndpoint(cfg.Endpoint)
	if strings.HasPrefix(cfg.Endpoint, "http://") || strings.HasPrefix(cfg.Endpoint, "https://") {
		opt = otlptracehttp.WithEndpointURL(cfg.Endpoint)
	}
	exp, err := otlptracehttp.New(ctx, opt)
	if err != nil {
		return nil, fmt.Errorf("creating the OTLP exporter: %w", err)
	}
	attrs := []attribute.KeyValue{semconv.ServiceName(cfg.Service)}
	if cfg.Version != "" {
		attrs = append(attrs, semconv.ServiceVersion(cfg.Version))
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(resource.NewSchemaless(attrs...)),
	)
	return &Provider{tp: tp}, nil
}

// Tracer returns the tracer of the component name (a package path).
func (p *Provider) Tracer(name string) *Tracer { return NewTracer(p.tp, name) }

// Shutdown exports the spans not yet exported and stops the provider.
func (p *Provider) Shutdown(ctx context.Context) error { return p.tp.Shutdown(ctx) }

// Tracer records spans of migrations. A nil *Tracer records nothing.
type Tracer struct {
	t oteltrace.Tracer
}

// NewTracer returns a tracer of tp (a test's in-memory provider, or a Provider's).
func NewTracer(tp oteltrace.TracerProvider, name string) *Tracer {
	return &Tracer{t: tp.Tracer(name)}
}

// MigrationContext returns ctx under the migration's trace: spans started from it belong to
// the trace every process derives from migrationID.
func MigrationContext(ctx context.Context, migrationID string) context.Context {
	sum := sha256.Sum256([]byte("lethe/v1/trace\x00" + migrationID))
	var tid oteltrace.TraceID
	var sid oteltrace.SpanID
	copy(tid[:], sum[:16])
	copy(sid[:], sum[16:24])
	sc := oteltrace.NewSpanContext(oteltrace.SpanContextConfig{
		TraceID: tid, SpanID: sid, TraceFlags: oteltrace.FlagsSampled, Remote: true,
	})
	return oteltrace.ContextWithRemoteSpanContext(ctx, sc)
}

// TraceID returns the trace id of migrationID's trace, as a tracing backend shows it.
func TraceID(migrationID string) string {
	return oteltrace.SpanContextFromContext(MigrationContext(context.Background(), migrationID)).TraceID().String()
}

// Span is a span in progress. A nil *Span (from a nil *Tracer) ends as a no-op.
type Span struct {
	s oteltrace.Span
}

// Start starts the span name of migration migrationID, with attrs.
func (t *Tracer) Start(ctx context.Context, migrationID, name string, attrs ...attribute.KeyValue) *Span {
	if t == nil {
		return nil
	}
	attrs = append(attrs, attribute.String(AttrMigration, migrationID))
	_, s := t.t.Start(MigrationContext(ctx, migrationID), name, oteltrace.WithAttributes(attrs...))
	return &Span{s: s}
}

// End ends the span; a non-nil err marks it failed with err's message, which must hold no
// secret (callers pass wire error codes or their own messages).
func (s *Span) End(err error, attrs ...attribute.KeyValue) {
	if s == nil {
		return
	}
	s.s.SetAttributes(attrs...)
	if err != nil {
		s.s.SetStatus(codes.Error, err.Error())
	}
	s.s.End()
}

// Phase records a span that has already happened: phase name of migration migrationID (a
// phase of the broker's, or a part of the agent's transfer the broker learnt of from its
// report), from start to end, failed with reason if reason is not empty.
func (t *Tracer) Phase(ctx context.Context, migrationID, name string, start, end time.Time, reason string, attrs ...attribute.KeyValue) {
	if t == nil {
		return
	}
	attrs = append(attrs, attribute.String(AttrMigration, migrationID))
	_, s := t.t.Start(MigrationContext(ctx, migrationID), name,
		oteltrace.WithTimestamp(start), oteltrace.WithAttributes(attrs...))
	if reason != "" {
		s.SetStatus(codes.Error, reason)
	}
	s.End(oteltrace.WithTimestamp(end))
}

// Open returns the tracer of component for a daemon named service that exports to endpoint,
// and the function that flushes and stops it (bounded by a few seconds, for shutdown); with
// endpoint empty, tracing is off: a nil tracer and a no-op stop.
func Open(ctx context.Context, endpoint, service, version, component string) (*Tracer, func(), error) {
	if endpoint == "" {
		return nil, func() {}, nil
	}
	p, err := NewProvider(ctx, Config{Endpoint: endpoint, Service: service, Version: version})
	if err != nil {
		return nil, nil, err
	}
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx) // spans lost at shutdown cost nothing but the trace
	}
	return p.Tracer(component), stop, nil
}
