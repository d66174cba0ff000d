package keybroker

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// percentile returns the p-th percentile (0-100) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p / 100)
	return s[i]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkRelease measures Release with a real Vault on loopback and two emulated SEV-SNP
// evidences: p50 and p99 of the whole, and the p50 of each phase, with the residency log in
// Vault as in production ("logged") and, as the baseline in the same run, with the log's
// records kept in memory ("log-in-memory": the cost of the entry without its Vault round
// trips). Making the evidence and aborting the migration afterwards (to free the guest) are
// not timed.
func BenchmarkRelease(b *testing.B) {
	for _, inMemory := range []bool{false, true} {
		name := "logged"
		if inMemory {
			name = "log-in-memory"
		}
		b.Run(name, func(b *testing.B) { benchmarkRelease(b, inMemory) })
	}
}

func benchmarkRelease(b *testing.B, logInMemory bool) {
	e := newEnv(b)
	e.direct()
	if logInMemory {
		e.kb.rlog.recs = newMemRecords()
	}
	e.adopt("vm1")
	signed := e.signedPolicy(1, nil)
	var total, verify, evaluate, vault, sealing, logging []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		id := fmt.Sprintf("bench-%d", i)
		m := e.newMigration(id, "vm1", "destination", signed)
		b.StartTimer()
		start := time.Now()
		resp, err := e.kb.Release(b.Context(), m.req)
		total = append(total, time.Since(start))
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		verify = append(verify, resp.Timings.Verify)
		evaluate = append(evaluate, resp.Timings.Evaluate)
		vault = append(vault, resp.Timings.Vault)
		sealing = append(sealing, resp.Timings.Seal)
		logging = append(logging, resp.Timings.Log)
		if _, err := e.kb.Destroy(b.Context(), e.abort(id, "vm1")); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(ms(percentile(total, 50)), "p50-ms")
	b.ReportMetric(ms(percentile(total, 99)), "p99-ms")
	b.ReportMetric(ms(percentile(verify, 50)), "verify-p50-ms")
	b.ReportMetric(ms(percentile(evaluate, 50)), "evaluate-p50-ms")
	b.ReportMetric(ms(percentile(vault, 50)), "vault-p50-ms")
	b.ReportMetric(ms(percentile(sealing, 50)), "seal-p50-ms")
	b.ReportMetric(ms(percentile(logging, 50)), "log-p50-ms")
}

// memRecords is a recordStore in memory, with KV v2's versions and check-and-set.
type memRecords struct {
	mu   sync.Mutex
	recs map[string]memRecord
}

type memRecord struct {
	ver  int
	data []byte
}

func newMemRecords() *memRecords { return &memRecords{recs: map[string]memRecord{}} }

func (m *memRecords) get(_ context.Context, path string, v any) (int, error) {
	m.mu.Lock()
	r, ok := m.recs[path]
	m.mu.Unlock()
	if !ok {
		return 0, nil
	}
	return r.ver, json.Unmarshal(r.data, v)
}

func (m *memRecords) put(_ context.Context, path string, v any, cas int) (int, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.recs[path].ver != cas {
		return 0, errConflict
	}
	m.recs[path] = memRecord{ver: cas + 1, data: b}
	return cas + 1, nil
}

func (m *memRecords) list(context.Context, string) ([]string, error) { return nil, nil }

func (m *memRecords) remove(_ context.Context, path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.recs, path)
	return nil
}

// BenchmarkPrimitives measures what a release is made of, one at a time.
func BenchmarkPrimitives(b *testing.B) {
	e := newEnv(b)
	e.direct()
	b.Run("transit-key-create", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if err := e.kb.keys.createKey(b.Context(), fmt.Sprintf("bench-create-%d", i), "aes256-gcm96"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("transit-datakey", func(b *testing.B) {
		if err := e.kb.keys.createKey(b.Context(), "bench-datakey", "aes256-gcm96"); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, _, err := e.kb.keys.dataKey(b.Context(), "bench-datakey"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("snp-verify-validate", func(b *testing.B) {
		a := e.attest("source", "bench", attest.RoleSource, nil)
		bnd := attest.BindingFor("bench", attest.RoleSource, a.att.Nonce, a.att.Evidence)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			c, err := e.verifier.Verify(b.Context(), a.att.Evidence, attest.Expectation{Binding: &bnd})
			if err != nil {
				b.Fatal(err)
			}
			if err := c.Check(attest.Requirements{SNP: attest.SNPRequirements{AllowSMT: true}}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("hpke-seal", func(b *testing.B) {
		k, err := seal.GenerateKey()
		if err != nil {
			b.Fatal(err)
		}
		keys := &seal.Keys{TK: make([]byte, seal.KeySize), MDK: make([]byte, seal.KeySize), Epoch: 2}
		pub := k.PublicKey()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := seal.Seal(pub, "bench", attest.RoleDestination, keys); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// direct rebuilds the keybroker on a client that talks to Vault without the test proxy.
func (e *env) direct() {
	e.t.Helper()
	c, err := vaulttest.NewClient(e.vault.Addr, e.vault.Token)
	if err != nil {
		e.t.Fatal(err)
	}
	e.cfg.Vault = c
	e.cfg.Logger = slog.New(slog.DiscardHandler)
	if e.kb, err = New(e.cfg); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(e.kb.rlog.waitIdle)
}

// BenchmarkDestroy measures Destroy under concurrency with a real Vault on loopback and the
// journal on disk: parallel goroutines, each ending migrations of its own adopted guest (an
// abort before any release, which records the abort, journals it, destroys the keys of its
// names, signs and stores the receipt, appends its log entry and proves it in a checkpoint:
// every step of a commit's ending but the proof's verification). It reports destroys/s and
// the p50 and p99 of one Destroy. Destroys of different guests share only the keybroker's
// locks (the residency log, the journal), Vault and the disk, so destroys/s should grow with
// parallelism until Vault or the disk is the limit.
func BenchmarkDestroy(b *testing.B) {
	for _, parallel := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("parallel=%d", parallel), func(b *testing.B) { benchmarkDestroy(b, parallel) })
	}
}

func benchmarkDestroy(b *testing.B, parallel int) {
	e := newEnv(b)
	e.direct()
	for w := range parallel {
		e.adopt(fmt.Sprintf("vm%d", w))
	}
	var (
		next  atomic.Int64
		mu    sync.Mutex
		total []time.Duration
		wg    sync.WaitGroup
	)
	b.ResetTimer()
	start := time.Now()
	for w := range parallel {
		vm := fmt.Sprintf("vm%d", w)
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				req := &kbwire.DestroyRequest{MigrationID: fmt.Sprintf("bench-%d", i), Tenant: "demo", VM: vm, Ending: kbwire.Abort}
				t0 := time.Now()
				resp, err := e.kb.Destroy(b.Context(), req)
				d := time.Since(t0)
				if err != nil {
					b.Error(err)
					return
				}
				if resp.Log == nil {
					b.Error("no inclusion proof with the receipt")
					return
				}
				mu.Lock()
				total = append(total, d)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "destroys/s")
	b.ReportMetric(ms(percentile(total, 50)), "p50-ms")
	b.ReportMetric(ms(percentile(total, 99)), "p99-ms")
}
