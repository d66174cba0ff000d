// Package natsrpc is Lethe's one NATS request/response edge: the server side that the broker,
// the keybroker and the agent answer their APIs with, and the typed client side that calls
// them.
//
// # Serving
//
// [Start] registers a NATS micro service whose endpoints a caller lists ([Endpoint]), in a
// queue group or not. For every request it, in order:
//
//   - drops it, unanswered and unhandled, when its reply subject is not one the endpoint's
//     [ReplyFunc] allows: a caller must not make the server publish, with the server's own
//     permissions, on a subject of the caller's choosing (JetStream's API above all). The rule
//     is data of the caller's (inbox prefixes, per operation where they differ);
//   - answers the busy code at once when MaxConcurrent handlers are already running, or when
//     the server is stopping: no request ever waits in an unbounded queue of goroutines;
//   - refuses a request larger than MaxRequest with the invalid-request code;
//   - runs the handler with a context that ends after RequestTimeout (and not when the
//     server's context ends: a request in progress finishes, bounded by its deadline);
//   - answers the handler's result as JSON, or its error as public code and message.
//
// Errors travel as the NATS micro error headers (Nats-Service-Error-Code and
// Nats-Service-Error), the shape every Lethe client reads. A handler's error is public only if
// the server's Public function maps it to a *wireerr.Error (by default: if it is or wraps
// one); any other error is answered as wireerr.CodeInternal with a fixed message, and logged.
// Messages go out on one line and bounded.
//
// [Server.Stop] stops taking requests (those the subscriptions still deliver are answered
// busy) and waits for the handlers in progress, up to DrainTimeout.
//
// # Calling
//
// [Call] sends a typed request and decodes a typed response. It applies a default timeout
// only when the context has none, refuses a response larger than its limit, and returns a
// server's error answer as a *wireerr.Error, so that callers match codes with errors.Is.
// When nobody answers it returns an error matching [ErrNoAnswer].
//
// The package never logs a request's or a response's payload.
package natsrpc
