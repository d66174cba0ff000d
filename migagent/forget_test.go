package migagent

import (
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// TestForgetThenAdoptAgain: the whole control plane (real NATS, Vault, keybroker, broker) and
// an agent. A guest is adopted; its VM is deleted; the tenant forgets it with a statement
// signed by its policy key, which the broker passes to the keybroker: the guest's key is gone
// from Vault. A VM of the same name then runs again (a dev stack run again) and is adopted
// afresh, at epoch 1 under a new key.
func TestForgetThenAdoptAgain(t *testing.T) {
	e := newEnv(t)
	tcb := attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 115}
	spec := GuestSpec{Tenant: testTenant, VM: testVM, MemoryBytes: 64 << 20}
	a := e.startNode("host-a", tcb, spec)
	e.waitHost("host-a", hasGuest(true))
	if _, err := e.tenant.AdoptGuest(t.Context(), &broker.AdoptGuestRequest{VM: testVM, Host: "host-a"}); err != nil {
		t.Fatalf("adopting: %v", err)
	}
	const key = "lethe-demo-web-e1"
	if !e.transitKeys(key)[key] {
		t.Fatalf("no key %s after the adoption", key)
	}

	// The VM is deleted: host-a's agent runs again without it.
	a.stop(t)
	e.startNode("host-a", tcb)
	e.waitHost("host-a", hasGuest(false))
	sign := func() []byte {
		t.Helper()
		signed, err := kbwire.SignTenant(kbwire.OpGuestForget, kbwire.ForgetGuestRequest{Tenant: testTenant, VM: testVM, Reason: "VM deleted"}, time.Now(), time.Minute, e.tenantKey)
		if err != nil {
			t.Fatal(err)
		}
		return signed
	}
	g, err := e.tenant.ForgetGuest(t.Context(), &broker.ForgetGuestRequest{VM: testVM, Reason: "VM deleted", Signed: sign()})
	if err != nil {
		t.Fatalf("forgetting: %v", err)
	}
	if g.Epoch != 1 || g.Host != "host-a" {
		t.Errorf("forgotten guest: %+v", g)
	}
	if e.transitKeys(key)[key] {
		t.Fatalf("key %s still in Vault after the forget", key)
	}

	// The VM runs again, and is adopted afresh.
	e.nodes["host-a"].stop(t)
	b := e.startNode("host-a", tcb, spec)
	e.waitHost("host-a", hasGuest(true))
	again, err := e.tenant.AdoptGuest(t.Context(), &broker.AdoptGuestRequest{VM: testVM, Host: "host-a"})
	if err != nil {
		t.Fatalf("adopting the guest again: %v", err)
	}
	if again.Epoch != 1 || !e.transitKeys(key)[key] {
		t.Errorf("adopted again: %+v, key there %v; want epoch 1 under a new key", again, e.transitKeys(key)[key])
	}
	guestRunning(t, b)
}
