// Package broker is Lethe's migration control plane: it keeps the registry of hosts, guests,
// signed tenant policies, migrations and receipts in NATS JetStream, runs the migration state
// machine of DESIGN.md, and serves the broker API to tenants and operators.
//
// The broker coordinates and is trusted with nothing secret. It never sees a plaintext key: it
// asks the keybroker for nonces, forwards evidence to it, and forwards the keys the keybroker
// sealed to each agent's ephemeral HPKE key without being able to open them. It stores tenants'
// signed policies as they were signed and never weakens one: its pre-filter (dry run,
// destination choice) is advice only; the keybroker's evaluation of the signed policy decides.
// A compromised broker can delay or deny a migration; it cannot obtain a key or a page.
//
// # Broker API
//
// A NATS micro service named "lethe-broker" in queue group "lethe-broker" (so several brokers
// share the load), served through package natsrpc: at most Config.MaxConcurrentRequests
// requests at once (beyond, the answer is "unavailable"), a deadline per request, drain on
// shutdown. Tenants call subjects that carry their own name, so NATS permissions confine
// each tenant to its prefix; operators have one prefix:
//
//	lethe.v1.broker.tenant.<tenant>.<op>
//	lethe.v1.broker.operator.<op>
//
// with <op> one of
//
//	policy.apply       ApplyPolicyRequest      → ApplyPolicyResponse
//	hosts.list         ListHostsRequest        → ListHostsResponse
//	guests.list        ListGuestsRequest       → ListGuestsResponse
//	guests.adopt       AdoptGuestRequest       → Guest
//	guests.forget      ForgetGuestRequest      → Guest (the record forgotten; the keybroker destroyed its key)
//	migrations.create  CreateMigrationRequest  → CreateMigrationResponse (DryRun: only the verdicts)
//	migrations.get     GetMigrationRequest     → Migration
//	migrations.list    ListMigrationsRequest   → ListMigrationsResponse (a page, newest first)
//	migrations.abort   AbortMigrationRequest   → Migration
//	receipts.get       GetReceiptRequest       → Receipt
//	receipts.list      ListReceiptsRequest     → ListReceiptsResponse (a page, by migration id)
//	migrations.events  MigrationEventsRequest  → MigrationEventsResponse (a page of LETHE_EVENTS)
//	policy.get         GetPolicyRequest        → PolicyView
//	policy.history     PolicyHistoryRequest    → PolicyHistoryResponse
//
// The tenant in the subject is the caller's identity: a tenant sees and acts on its own
// guests, migrations and receipts only (anything else is "not found"), and the Tenant field of
// a tenant's request must be empty or its own name. Errors are natsrpc error answers whose code
// is one of the Code* constants, with the error's text for errors that match an Err* sentinel
// and a fixed text for internal ones; [Client] returns them as *wireerr.Error matching both
// the code and its Err* sentinel. The keybroker's error answers are classified by their kbwire
// code (ErrDenied, ErrUnavailable), never by their text.
//
// # Agent API and keybroker API
//
// The broker calls each host's agent on lethe.v1.agent.<host>.<op> (package
// migagent/agentapi holds that contract) and the keybroker on lethe.v1.keybroker.<op>
// ([KeyBroker], [KeyBrokerClient]). It subscribes, in its queue group, to the agents' progress
// on lethe.v1.agent.<host>.progress.<migration-id> and accepts a report only from the
// migration's source host.
//
// # State
//
//	KV lethe-migrations  migration records (Migration), key = migration id
//	KV lethe-hosts       host records written by agents (agentapi.HostRecord), with a TTL
//	KV lethe-policies    signed policy envelopes, key <tenant> or <tenant>.<vm>
//	KV lethe-guests      guests (Guest): tenant, host, epoch, wrapped memory key, active migration
//	KV lethe-receipts    signed receipts with their residency-log proofs (Receipt), key = migration id
//	stream LETHE_EVENTS  lethe.v1.events.<migration-id>: transitions, progress, audit
//
// # The state machine
//
//	Requested → Attesting → KeysReleased → Transferring → CuttingOver → Committed → Erased
//	      (any phase before the commit acknowledgement) → Aborting → Aborted
//
// Every transition is a compare-and-swap on the record's revision. Any broker can advance any
// migration: it claims the record with a lease (owner id and expiry, written by CAS), runs the
// step of the current phase, and CASes to the next phase, renewing the lease as it goes. A
// crashed broker's lease expires and another broker reruns the step, so every step is
// idempotent: Attesting asks for fresh nonces and evidence, KeysReleased delivers the same
// sealed keys again, Transferring calls the source's transfer again (which re-attaches), and
// Committed and Aborting repeat erase, destroy and the receipt.
//
// The lease (Config.Lease) lasts 15 s by default, and a broker renews it while it holds the
// migration: at each look at the record once less than half is left, and every third of it
// while a step runs, however long the step's calls to agents and the keybroker take
// (Config.AgentTimeout each). So a killed broker's migrations continue on another broker
// within the lease and a check interval, and a live broker does not lose a migration in the
// middle of a step. The transfer itself never waits on a broker: the agents move pages
// between themselves, the source's progress reports are recorded by whichever broker hears
// them, and the broker that takes a transfer over re-attaches to it, never aborts it for the
// change of owner.
//
//   - Requested: migrations.create checked the guest (adopted, on a live source host, not
//     migrating: the guest record's active migration is taken by CAS, so of two concurrent
//     requests exactly one proceeds), the tenant's policy, and the destination.
//     It waits there until its source and destination each have a place for it (admission.go:
//     Config.MaxMigrationsPerHost, lowered to what the host's agent states), saying why.
//   - Attesting: a keybroker nonce per role; the source attests, the destination prepares
//     (clean-memory statement, data endpoint); the keybroker releases keys or denies.
//   - KeysReleased: the sealed keys are delivered to each agent.
//   - Transferring, CuttingOver: the source's transfer runs; its progress is recorded. Its
//     committed report carries the destination's commit acknowledgement.
//   - Committed: the source erases and returns erasure evidence; the keybroker destroys the
//     migration key and epoch e and signs the receipt; the receipt is stored; the guest record
//     moves to the destination with epoch e+1; then Erased.
//   - Aborting: the destination aborts (scrubs), the source aborts (resumes the guest), the
//     keybroker destroys the migration key and epoch e+1 and signs the abort receipt; Aborted.
//     A source that already holds the commit acknowledgement refuses to abort, and the
//     migration goes on to Committed instead.
//
// A migration aborts on request (until cutover starts), on denial, on a phase timeout
// ([Timeouts]: in the queue for admission, from the admission to the transfer's start, without
// progress, and per GiB of guest memory), and on
// the loss of an agent (its host record gone from lethe-hosts or its heartbeat older than the
// host TTL).
//
// # NATS security
//
// Package natsauth makes the NATS server configuration (natsauth.WriteServerConfig): one
// account with a user per role, and permissions such that an agent publishes only on its own
// host's subjects, a tenant only calls the broker API under its own name and has no JetStream
// access, and only the broker calls agents and the keybroker. The broker answers a caller only
// under that caller's inbox prefix (natsauth.ReplyAllowed).
package broker
