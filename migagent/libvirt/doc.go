// Package libvirt is the agent's view of its host's hypervisor: it drives a local libvirtd
// over its unix socket (github.com/digitalocean/go-libvirt) to report the host and its guests,
// read migration progress, and run a live migration step by step with libvirt's migration
// protocol version 3 with parameters, so that the hypervisor's migration stream goes only to
// endpoints the agents own.
//
// # Migration
//
// A migration is five steps on two hosts, each run by that host's agent, with an opaque
// cookie handed from each step to the next over the control plane:
//
//	source       Begin    → Offer{XML, Cookie, Flags}
//	destination  Prepare  (listens on a local endpoint the destination agent feeds) → Accepted{Cookie}
//	source       Perform  (QEMU sends to a local endpoint the source agent owns)    → cookie
//	destination  Finish   (cancelled if Perform failed)                               → cookie
//	source       Confirm  (cancelled if Perform or Finish failed: the guest runs on here)
//
// The bytes between the two local endpoints are carried by someone else: the agents'
// encrypted transport, or a test relay. [ListenEndpoint] gives the source agent the
// connection its hypervisor opens, [DialEndpoint] gives the destination agent a connection to
// its hypervisor's listener; both are io.ReadWriteClosers that support half-close. [Migrate]
// runs the five steps in one process, with both connections, the way libvirt's own client
// does, and is the reference for how the agents split them.
//
// The agent drives these types through a small interface of its own; package libvirttest
// is an in-memory hypervisor with the same methods, for the agent's tests without libvirtd.
//
// # What it must never do
//
// It never sends a migration stream anywhere but a local endpoint: [Endpoint] accepts only
// unix sockets and loopback TCP addresses, and nothing here asks libvirt to connect to
// another host (no peer-to-peer or tunnelled migration). A failed or cancelled migration
// always ends with Finish and Confirm cancelled, so the guest keeps running at the source and
// the destination keeps no domain. It never logs a cookie or domain XML.
//
// Caveat: on hosts without SEV-SNP or TDX the hypervisor's migration stream is guest memory
// in the clear until it reaches the local endpoint; the endpoint's unix socket or loopback
// port must be reachable only by the agent and the hypervisor.
package libvirt
