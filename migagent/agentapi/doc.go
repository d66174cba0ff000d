// Package agentapi is the contract between the broker and the per-host migration agents: the
// NATS subjects, the JSON wire structs, a client the broker uses, a server adapter ([Serve])
// that an agent plugs its implementation ([Handler]) into, and the host registration record
// that agents keep fresh in JetStream.
//
// # Subjects
//
// Every agent serves request/reply operations on its own host's subjects:
//
//	lethe.v1.agent.<host>.attest    AttestRequest   → attest.Evidence           (source, adopt)
//	lethe.v1.agent.<host>.prepare   PrepareRequest  → PrepareResponse           (destination)
//	lethe.v1.agent.<host>.keys      KeysRequest     → KeysResponse              (both)
//	lethe.v1.agent.<host>.transfer  TransferRequest → Progress                  (source)
//	lethe.v1.agent.<host>.status    StatusRequest   → Status                    (both)
//	lethe.v1.agent.<host>.erase     EraseRequest    → attest.Evidence           (source, after commit)
//	lethe.v1.agent.<host>.abort     AbortRequest    → AbortResponse             (both)
//
// The server and the client are package natsrpc's: bounded concurrent handlers (CodeBusy
// beyond), a deadline per request, drain on shutdown. A failed operation answers with the NATS
// micro error headers (Nats-Service-Error-Code and Nats-Service-Error); the client turns them
// into a *wireerr.Error whose code is one of the Code* constants, and which also matches the
// code's Handler sentinel. A Handler error that matches no sentinel is answered as internal,
// without its text.
//
// transfer returns at once with the transfer's current state (phase "started" the first
// time); the source agent then publishes [Progress] on
//
//	lethe.v1.agent.<host>.progress.<migration-id>
//
// through phases precopy, cutover and finally committed (carrying the destination's commit
// acknowledgement) or failed. Calling transfer again for the same migration must not start a
// second transfer: it returns the current state. That is how a broker that took over a
// migration re-attaches to it.
//
// # Host registration
//
// An agent registers and heartbeats by sending its [HostRecord] as a request on
// lethe.v1.agent.<host>.heartbeat ([PutHost], [Heartbeater]); a broker checks that the record
// names the host of the subject and writes it into the JetStream key-value bucket lethe-hosts.
// Agents never write the bucket themselves: NATS permissions cannot filter headers, so an agent
// allowed to publish on its key could roll up or purge every host's record. The bucket has a
// TTL, so the record of a host that stopped heartbeating disappears; the broker also treats a
// record whose heartbeat is older than its host TTL as lost.
//
// # Permissions and security
//
// An agent's NATS user may publish only on lethe.v1.agent.<host>.> and on the broker's replies
// reserved for its host ([ReplyPrefix]), and subscribe only to its own subjects and its own
// inbox prefix ([InboxPrefix]); so an agent cannot answer or report for another host, and no
// one can make it publish elsewhere through a reply subject. The server side checks the same:
// a request whose reply subject is not under [ReplyPrefix] of its host is dropped and logged.
// Nothing secret crosses this API unsealed: keys arrive sealed with HPKE to the agent's
// ephemeral key, and evidence and statements are public by design. This package must never
// carry a plaintext key or a page.
package agentapi
