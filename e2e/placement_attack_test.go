package e2e

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// advertisedTCB is an agent that lies in its host record to be chosen: with the real
// permissions of host b, whose platform reports a TCB below the source's, it heartbeats a
// record that claims a higher TCB and an empty, vast host. Placement ranks b first, as the
// record says; the keybroker, which reads b's verified evidence, refuses it
// (destinationTcbAtLeastSource), and the migration moves to the next candidate, c. What the
// lie gains: one refused attempt, named in the migration's record and in the residency log.
func advertisedTCB(s *scn) {
	vm, other := s.vm("g"), s.vm("c")
	zone := fmt.Sprintf("zone=placement-%02d", s.index)
	a := s.agent(snp(snpBase, vm))
	// b heartbeats once, at its start: from then on the forger speaks for it.
	b := s.agent(agentSpec{platform: attest.PlatformEmulatedSEVSNP, tcb: snpWeak, labels: zone, extra: []string{"--heartbeat-interval", "1h"}})
	// c runs a guest, so that a vast empty host ranks before it on memory.
	c := s.agent(agentSpec{platform: attest.PlatformEmulatedSEVSNP, tcb: snpBase, labels: zone, guests: []string{other}})
	s.adopt(vm, a) // before the policy, which would refuse a's labels as an adoption's host
	if err := s.policy(vm, insertAfter(s.basePolicy, "  destination:", "    platforms: [emulated-sev-snp, emulated-tdx]",
		"    hostLabels:\n      zone: "+strings.TrimPrefix(zone, "zone="))); err != nil {
		s.t.Fatalf("applying the policy: %v", err)
	}

	ctx := s.t.Context()
	stop := forgeHighTCB(s, b)
	defer stop()

	dry, err := s.demo.CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm, DryRun: true})
	if err != nil {
		s.t.Fatal(err)
	}
	if len(dry.DryRun.Order) < 2 || dry.DryRun.Order[0] != b.host || dry.DryRun.Order[1] != c.host {
		s.t.Fatalf("placement order %v, want the liar %s first, then %s", dry.DryRun.Order, b.host, c.host)
	}
	resp, err := s.demo.CreateMigration(ctx, &broker.CreateMigrationRequest{VM: vm})
	if err != nil {
		s.t.Fatal(err)
	}
	id := resp.Migration.ID
	if resp.Migration.Destination != b.host {
		s.t.Fatalf("placed on %s, want the liar %s", resp.Migration.Destination, b.host)
	}
	m := s.requireEnd(id, vm, broker.OutcomeErased, a, c)
	stop()
	if m.Destination != c.host || len(m.Attempts) != 1 || m.Attempts[0].Destination != b.host || !strings.Contains(m.Attempts[0].Reason, "microcode") {
		s.t.Fatalf("migration ended on %s with attempts %+v; want %s, after one refusal of %s naming the microcode", m.Destination, m.Attempts, c.host, b.host)
	}
	s.outcome = fmt.Sprintf("liar ranked first, refused by the keybroker (%s), committed on the next candidate", firstLine(m.Attempts[0].Reason))
}

// firstLine returns s up to its first rule: enough of a denial for the report.
func firstLine(s string) string {
	if i := strings.Index(s, "microcode"); i >= 0 {
		return s[i:min(len(s), i+40)]
	}
	return s
}

// forgeHighTCB makes host b, whose platform reports ucode 100, heartbeat with its agent's real
// NATS permissions a record that claims snpHigher and a vast empty host, until stop is called
// (b's own agent must heartbeat only at its start: --heartbeat-interval 1h). It returns once
// the broker stores the forged record.
func forgeHighTCB(s *scn, b *agent) (stop func()) {
	ctx := s.t.Context()
	rec, ok, err := getKV[agentapi.HostRecord](ctx, s.js, broker.HostsBucket, b.host)
	if err != nil || !ok {
		s.t.Fatalf("host record of %s: %v", b.host, err)
	}
	if rec.TCB == nil || rec.TCB.SNP == nil || rec.TCB.SNP.Microcode != 100 {
		s.t.Fatalf("host %s states TCB %v, want its platform's (ucode 100)", b.host, rec.TCB)
	}
	high, err := attest.ParseHostTCB(snpHigher)
	if err != nil {
		s.t.Fatal(err)
	}
	forged := *rec
	forged.TCB, forged.AllocatableBytes, forged.Guests = &high, 1<<50, nil
	nc, _ := s.connectAsAgent(s.t, b)
	fctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			forged.Heartbeat = time.Now()
			_ = agentapi.PutHost(fctx, nc, &forged)
			select {
			case <-fctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	poll(s.t, "the forged record of "+b.host, func() (bool, string) {
		r, ok, err := getKV[agentapi.HostRecord](ctx, s.js, broker.HostsBucket, b.host)
		if err != nil || !ok || r.TCB == nil || !r.TCB.Equal(high) {
			return false, "not yet stored"
		}
		return true, ""
	})
	return cancel
}
