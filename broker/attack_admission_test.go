package broker_test

import (
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// TestAttackOneTenantHoldsEveryPlaceOfAHost: a tenant with as many guests as a destination
// has places names that destination for each of them. Another tenant's migration to the
// same host must still be admitted while the first tenant's are in flight: a host's places
// are shared among tenants, so that one tenant cannot keep every other tenant's guests from
// reaching (or, on the source side, leaving) a host until their queue timeout aborts them.
func TestAttackOneTenantHoldsEveryPlaceOfAHost(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.cfg.MaxMigrationsPerHost = 10
	e.startBroker("b1")
	guests := guestsOf(4)
	victim := agentapi.HostGuest{Tenant: "globex", VM: "db", MemoryBytes: guestMiB << 20}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, guests...)
	e.addAgent("h3", attest.PlatformEmulatedSEVSNP, "eu", nil, victim)
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil)
	e.limitHost("h2", 4)
	for _, g := range guests {
		e.adopt(tenant, g.VM, "h1")
	}
	e.adopt(victim.Tenant, victim.VM, "h3")

	// The attacker asks first, for every place of h2.
	var held int
	for _, g := range guests {
		resp := e.migrateTo(g.VM, "h2")
		m := e.waitMigration(resp.Migration.ID, func(m *broker.Migration) bool {
			return m.Phase == broker.PhaseTransferring && m.Progress != nil || m.Phase == broker.PhaseRequested && m.Waiting != "" || m.Phase.Terminal()
		})
		if m.Phase == broker.PhaseTransferring {
			held++
		}
	}
	t.Logf("tenant %s holds %d of h2's 4 places", tenant, held)

	resp, err := e.tenant(victim.Tenant).CreateMigration(t.Context(), &broker.CreateMigrationRequest{VM: victim.VM, Destination: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	m := e.waitMigration(resp.Migration.ID, func(m *broker.Migration) bool {
		return m.Phase == broker.PhaseTransferring && m.Progress != nil || m.Phase == broker.PhaseRequested && m.Waiting != "" || m.Phase.Terminal()
	})
	if m.Phase != broker.PhaseTransferring {
		t.Fatalf("tenant %s's migration to h2: %s, waiting %q: tenant %s holds every place of the host", victim.Tenant, m.Phase, m.Waiting, tenant)
	}
}
