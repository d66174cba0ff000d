// Package natsauth is who may do what on Lethe's NATS: the roles that get NATS users, the
// subject roots of each service, the inbox prefix each role must connect with, the subject
// permissions of each role, and the nats-server configuration that grants them
// ([WriteServerConfig]).
//
// It is a leaf: it imports no NATS server or client, no Vault, and none of the broker,
// keybroker or agent cores, so that every binary (the in-TEE agent and lethectl above all) can
// name its inbox prefix and role without linking server code. The subject roots of the broker,
// the keybroker and the agents are defined here and re-exported by their packages. Turning a configuration into nats-server options
// is left to the one binary that embeds a server (lethe-broker in development mode).
//
// # Security
//
// The inbox prefixes are the basis of reply confinement: each user may subscribe only to its
// own inbox, and each server answers only under the inbox prefixes of the roles allowed to call
// it ([ReplyAllowed]), so no caller can make a server publish, with the server's permissions, on a
// subject of the caller's choosing. No role gets a general response permission
// (allow_responses), only the broker's store user may use JetStream, and nobody may publish on
// $SRV.>. A configuration without users is refused unless it is for development ([ErrNoAuth]).
package natsauth
