package keybroker

import (
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
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
// evidences: p50 and p99 of the whole, and the p50 of each phase. Making the evidence and
// aborting the migration afterwards (to free the guest) are not timed.
func BenchmarkRelease(b *testing.B) {
	e := newEnv(b)
	e.direct()
	e.adopt("vm1")
	signed := e.signedPolicy(1, nil)
	var total, verify, evaluate, vault, sealing []time.Duration
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
}
