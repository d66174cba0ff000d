// Package migagent is the Lethe migration agent: the per-host daemon that serves the agent API
// (package agentapi) for the broker, keeps its host record fresh in JetStream with the guests
// it currently holds, and runs the data plane (package dataplane) for each migration.
//
// A Node holds its guests as dataplane Regions (in-process memory or a guest RAM file), each
// with a synthetic workload that keeps dirtying pages and a memory data key MDK once the guest
// has a residency (adoption, or the release of the migration that brought it). For a
// migration the Node:
//
//   - attests (role source or adopt): makes an ephemeral HPKE key pair for the migration and
//     binds its public key into its evidence (attest.Binding); adoption evidence also states
//     the clean-memory statement of the guest's launch (the agent scrubs an in-process
//     guest's memory before starting it; a received guest keeps its receive region's);
//   - prepares (destination): scrubs a fresh receive region, states it clean, attests (role
//     destination) with that statement and opens a data-plane listener;
//   - opens the sealed keys with the migration's HPKE key, once the keybroker's grant checks
//     out for what the Node knows itself (package grant). A source or destination keeps the
//     HPKE private key until its transfer or reception ends, because the data-plane handshake
//     makes it prove it holds that key, and zeroizes it then (or when the migration is
//     aborted); an adoption zeroizes it at once;
//   - transfers (source) in the background, reporting progress (precopy, cutover, committed
//     with the commit acknowledgement and the memory digest, or failed); the destination
//     receives, checks the memory digest, and resumes the guest on the received region;
//   - erases (source, after commit): the data plane has zeroized TK and MDK and scrubbed the
//     guest's pages; the Node attests (role erased) with the erasure statement, bound to the
//     HPKE key the grant names for it;
//   - aborts before commit: the destination scrubs and zeroizes (and attests that, role
//     erased, which the keybroker requires before it destroys the destination's keys), the
//     source drops TK and resumes the guest. A source or a destination that holds the commit
//     acknowledgement (the destination resumed the guest) answers with it instead.
//
// Each migration is one state machine (state.go): a phase, changed only along the edges of
// one table, with the migration's keys held in one place and wiped on entry to every phase
// that holds none, so that "no key after the commit or abort that ends a migration" is one
// rule rather than a check in each handler. Each migration has its own lock; the node's
// lock guards only its maps and is never held across I/O, so a long scrub of one
// migration's memory stalls neither the heartbeats nor the other migrations. A backend
// (backend.go) holds and moves the guests: in-process memory, or libvirt domains.
//
// With Config.Libvirt set, the guests are instead the host's libvirt domains (a domain names
// its tenant and VM in its metadata, or belongs to a configured tenant), and a migration
// carries the hypervisor's own migration stream through the data plane, with libvirt's
// migration steps driven on both hosts and their cookies passed in-band (libvirt.go). The
// destination acknowledges only once the guest runs there; the source confirms it is gone
// after the acknowledgement, and cancels the migration (the guest runs on) on any failure
// before it. Such a migration has no memory digest and scrubs no pages: the hypervisor owns
// the guest's memory.
//
// When Run's context ends, migrations in flight are aborted: keys are zeroized, receive
// regions scrubbed, and a source guest paused for cutover is resumed.
//
// The Node must never send a page unencrypted (pages leave only through the data plane's sealed
// streams), never keep a key after the commit or abort that ends it (TK, the migration's HPKE
// private key, the MDK of a residency that ended), and never log a key, a sealed key blob,
// or raw evidence.
//
// Caveats: a destination accepts zero-page elision whenever the source proposes it (the source
// decides, from the tenant's policy as the keybroker reports it to the broker); a source whose
// FIN went out but whose commit acknowledgement never came cannot know whether the destination
// resumed the guest: it keeps the guest paused and reports the transfer failed, and acts only
// on the keybroker's signed receipt of how the migration ended (resumes for aborted, drops its
// copy for committed); an abort without one leaves the guest paused, so no broker can make the
// guest run in two places. Without libvirt, guests are synthetic: a workload writing a Region
// stands in for a VM.
package migagent
