package broker_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// BenchmarkMigrations measures migrations of tiny guests per second through one broker, with
// fake agents and a fake keybroker, several migrations in flight at once.
func BenchmarkMigrations(b *testing.B) {
	e := newEnv(b, natstest.Options{})
	e.cfg.Logger = discardLogger()
	e.startBroker("bench")
	const guests = 16
	var gs []agentapi.HostGuest
	for i := range guests {
		gs = append(gs, agentapi.HostGuest{Tenant: tenant, VM: fmt.Sprintf("vm%d", i), MemoryBytes: 1 << 20})
	}
	e.addAgent("h1", attest.PlatformEmulatedSEVSNP, "eu", nil, gs...).AutoCommit = true
	e.addAgent("h2", attest.PlatformEmulatedSEVSNP, "eu", nil, gs...).AutoCommit = true
	for _, g := range gs {
		e.adopt(tenant, g.VM, "h1")
	}
	client := e.tenant(tenant)
	var next atomic.Int64
	b.SetParallelism(guests / 2) // with GOMAXPROCS=2: 16 goroutines, one guest each
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		vmName := fmt.Sprintf("vm%d", next.Add(1)-1)
		at := "h1"
		for pb.Next() {
			to := map[string]string{"h1": "h2", "h2": "h1"}[at]
			resp, err := client.CreateMigration(context.Background(), &broker.CreateMigrationRequest{VM: vmName, Destination: to})
			if err != nil {
				b.Error(err)
				return
			}
			m := e.waitMigration(resp.Migration.ID, inPhase(broker.PhaseErased, broker.PhaseAborted))
			if m.Phase != broker.PhaseErased {
				b.Errorf("migration %s: %s (%s)", m.ID, m.Phase, m.AbortReason)
				return
			}
			at = to
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "migrations/s")
}

// BenchmarkHosts registers 1,000 emulated hosts, then measures heartbeats (KV puts through
// the agents' path) and the broker's view of all hosts.
func BenchmarkHosts(b *testing.B) {
	const hosts = 1000
	e := newEnv(b, natstest.Options{})
	e.cfg.Logger = discardLogger()
	e.startBroker("bench")
	nc := e.srv.Connect(b)
	recs := make([]agentapi.HostRecord, hosts)
	for i := range recs {
		recs[i] = agentapi.HostRecord{Host: fmt.Sprintf("host%04d", i), Platform: attest.PlatformEmulatedSEVSNP,
			Region: "eu", Labels: map[string]string{"rack": fmt.Sprint(i % 40)}, DataAddr: "10.0.0.1:7400", Heartbeat: e.clock.Now()}
		if err := agentapi.PutHost(context.Background(), nc, &recs[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("heartbeat", func(b *testing.B) {
		var next, busy atomic.Int64
		b.SetParallelism(32)
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				rec := recs[int(next.Add(1))%hosts]
				rec.Heartbeat = e.clock.Now()
				// Beyond the broker's admission limit a heartbeat is answered busy, and an
				// agent sends the next one at its interval: counted, not an error.
				if err := agentapi.PutHost(context.Background(), nc, &rec); errors.Is(err, agentapi.CodeBusy) {
					busy.Add(1)
				} else if err != nil {
					b.Error(err)
					return
				}
			}
		})
		elapsed := time.Since(start).Seconds()
		b.ReportMetric(float64(int64(b.N)-busy.Load())/elapsed, "puts/s")
		b.ReportMetric(float64(busy.Load())/float64(b.N), "busy-fraction")
	})
	b.Run("list", func(b *testing.B) {
		client := e.operator()
		for b.Loop() {
			resp, err := client.ListHosts(context.Background(), &broker.ListHostsRequest{})
			if err != nil {
				b.Fatal(err)
			}
			if len(resp.Hosts) != hosts {
				b.Fatalf("%d live hosts, want %d", len(resp.Hosts), hosts)
			}
		}
	})
}
