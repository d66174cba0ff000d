package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
)

// fleetAttackScenarios are the attacks on fleet operations that need real agents and their
// NATS permissions (TestE2EFleetAttack).
var fleetAttackScenarios = []scenario{
	{"adversarial/agent-lies-its-way-into-an-evacuation", evacuationLiar},
}

func TestE2EFleetAttack(t *testing.T) {
	runScenarios(t, fleetAttackScenarios)
}

// evacuationLiar: an operator evacuates the hosts below snpBase. Host b is below it too
// (ucode 100), but, with its agent's real permissions, it heartbeats a record claiming
// snpHigher and a vast empty host: the evacuation does not select it, and placement ranks it
// first for the evacuated guest. The tenant's policy asks only that a destination be at least
// the source (weak, as b is), so the keybroker would release to b: the evacuation's own
// minimum must be checked on the evidence, not on the record. The guest lands on c, after one
// refusal of b naming its TCB.
func evacuationLiar(s *scn) {
	vm := s.vm("g")
	a := s.agent(snp(snpWeak, vm))
	b := s.agent(agentSpec{platform: attest.PlatformEmulatedSEVSNP, tcb: snpWeak, extra: []string{"--heartbeat-interval", "1h"}})
	c := s.agent(snp(snpBase))
	s.adopt(vm, a)

	ctx := s.t.Context()
	stop := forgeHighTCB(s, b)
	defer stop()

	resp, err := s.ops.Evacuate(ctx, &broker.EvacuateRequest{BelowTCB: snpBase, Reason: "e2e: microcode update"})
	if err != nil {
		s.t.Fatalf("evacuating: %v", err)
	}
	if len(resp.Operation.Hosts) != 1 || resp.Operation.Hosts[0] != a.host {
		s.t.Fatalf("the evacuation drains %v, want %s alone (the liar claims %s)", resp.Operation.Hosts, a.host, snpHigher)
	}
	op := s.waitOp(resp.Operation.ID)
	stop()
	if op.State != broker.FleetDone || len(op.Items) != 1 {
		s.t.Fatalf("evacuation %s ended %s: %+v", op.ID, op.State, op.Items)
	}
	it := op.Items[0]
	if it.To != c.host {
		s.t.Fatalf("%s evacuated onto %s (%s %s), want %s: %s's evidence is below %s", it.VM, it.To, it.Status, it.Outcome, c.host, b.host, snpBase)
	}
	s.expect(it.Migration, vm, broker.OutcomeErased, a, c)
	// No other host is at c's TCB: a probe from c has nowhere to go.
	s.noProbe[vm] = "on the only host at its TCB"
	m, err := s.ops.GetMigration(ctx, it.Migration)
	if err != nil {
		s.t.Fatal(err)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Destination != b.host || !strings.Contains(m.Attempts[0].Reason, "below") {
		s.t.Errorf("attempts %+v, want one refusal of %s naming its TCB", m.Attempts, b.host)
	}
	s.outcome = fmt.Sprintf("liar ranked first, refused on its evidence (%s), evacuated onto %s", m.Attempts[0].Reason, c.host)
}
