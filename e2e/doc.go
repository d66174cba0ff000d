// Package e2e holds Lethe's end-to-end, fault and adversarial tests: whole migrations on real
// NATS, Vault and libvirt, with nothing faked at the edges. It has no code of its own besides
// test helpers and must never be imported.
//
// Tests that need two libvirt hosts carry the build tag libvirt and run with
// `make e2e-libvirt`, which starts the hosts first (scripts/libvirt-hosts.sh up). Their Linux
// guest runs the program in e2e/guestload as its init, which the tests build and pack into
// an initramfs themselves.
package e2e
