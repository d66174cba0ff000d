// Package kbwire is the keybroker API's wire contract: its NATS subjects, the JSON of its
// requests and responses, and its error codes. The keybroker's core (package keybroker), its
// NATS edge (package natsapi) and the broker's client of it (package broker) all use these
// types under these names only, so that the contract has one definition and the broker can
// speak it without linking the keybroker's core and its Vault client.
//
// It holds data only: no behaviour, no validation (the keybroker checks every request it
// decodes). It must never import Vault, NATS or the keybroker's core; a test fails if it does.
// Its codes are internal/wireerr's, a leaf.
package kbwire
