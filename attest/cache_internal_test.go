package attest

import (
	"crypto/x509"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-sev-guest/abi"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/verify/trust"
)

// CacheStats are the hits and sizes of a Verifier's SEV-SNP caches, for the tests of package
// attest_test.
type CacheStats struct {
	ChainHits, CRLHits       uint64
	ChainEntries, CRLEntries int
}

// SNPCacheStats returns v's SEV-SNP cache statistics.
func SNPCacheStats(v *Verifier) CacheStats {
	return CacheStats{
		ChainHits: v.snp.chains.hits.Load(), CRLHits: v.snp.crls.hits.Load(),
		ChainEntries: v.snp.chains.len(), CRLEntries: v.snp.crls.len(),
	}
}

// keysOf returns the values of c from most to least recently used.
func keysOf(c *verifiedCache[string]) []string {
	var out []string
	for e := c.order.Front(); e != nil; e = e.Next() {
		out = append(out, e.Value.(*cacheItem[string]).val)
	}
	return out
}

func TestVerifiedCacheEviction(t *testing.T) {
	k := func(s string) cacheKey { return keyOf("test", []byte(s)) }
	tests := []struct {
		name string
		max  int
		ops  func(c *verifiedCache[string])
		want []string
	}{
		{name: "under the bound", max: 3, ops: func(c *verifiedCache[string]) {
			c.put(k("a"), "a")
			c.put(k("b"), "b")
		}, want: []string{"b", "a"}},
		{name: "oldest evicted", max: 2, ops: func(c *verifiedCache[string]) {
			c.put(k("a"), "a")
			c.put(k("b"), "b")
			c.put(k("c"), "c")
		}, want: []string{"c", "b"}},
		{name: "a hit keeps an entry", max: 2, ops: func(c *verifiedCache[string]) {
			c.put(k("a"), "a")
			c.put(k("b"), "b")
			c.get(k("a"))
			c.put(k("c"), "c")
		}, want: []string{"c", "a"}},
		{name: "a put replaces", max: 2, ops: func(c *verifiedCache[string]) {
			c.put(k("a"), "a")
			c.put(k("b"), "b")
			c.put(k("a"), "a2")
			c.put(k("c"), "c")
		}, want: []string{"c", "a2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newVerifiedCache[string](tt.max)
			tt.ops(c)
			if diff := cmp.Diff(tt.want, keysOf(c)); diff != "" {
				t.Errorf("entries (-want +got):\n%s", diff)
			}
			if c.len() != len(c.items) {
				t.Errorf("list holds %d entries, map %d", c.len(), len(c.items))
			}
		})
	}
}

// TestVerifiedCacheConcurrent uses one cache from many goroutines (run with -race).
func TestVerifiedCacheConcurrent(t *testing.T) {
	c := newVerifiedCache[int](16)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				k := keyOf("test", fmt.Appendf(nil, "%d", (g*7+i)%40))
				if v, ok := c.get(k); ok && v < 0 {
					t.Errorf("got %d", v)
				}
				c.put(k, i)
			}
		})
	}
	wg.Wait()
	if n := c.len(); n > 16 {
		t.Errorf("cache holds %d entries, bound 16", n)
	}
}

func TestKeyOf(t *testing.T) {
	b := func(s string) []byte { return []byte(s) }
	distinct := map[string]cacheKey{
		"ab|c":      keyOf("l", b("ab"), b("c")),
		"a|bc":      keyOf("l", b("a"), b("bc")),
		"abc":       keyOf("l", b("abc")),
		"abc|":      keyOf("l", b("abc"), nil),
		"other tag": keyOf("m", b("ab"), b("c")),
	}
	seen := map[cacheKey]string{}
	for name, k := range distinct {
		if other, ok := seen[k]; ok {
			t.Errorf("%s and %s share a key", name, other)
		}
		seen[k] = name
	}
	if keyOf("l", b("ab"), b("c")) != distinct["ab|c"] {
		t.Error("keyOf is not deterministic")
	}
}

// TestSNPChainKeyRoots checks that chain entries of different roots, or of the same roots in
// another order, never share a key.
func TestSNPChainKeyRoots(t *testing.T) {
	pcs := map[string]*trust.ProductCerts{}
	for _, line := range snpProductLines {
		r, err := trust.GetDefaultRootCerts(line)
		if err != nil {
			t.Fatal(err)
		}
		pcs[line] = r.ProductCerts
	}
	// The Milan ARK with Genoa's ASK: a root that differs from Milan's in one certificate.
	mixed := &trust.ProductCerts{Ark: pcs["Milan"].Ark, Ask: pcs["Genoa"].Ask, Asvk: pcs["Milan"].Asvk}
	report := &spb.Report{}
	ek := []byte("endorsement key certificate")
	sets := map[string][]*trust.ProductCerts{
		"none":         nil,
		"Milan":        {pcs["Milan"]},
		"Genoa":        {pcs["Genoa"]},
		"mixed":        {mixed},
		"Milan, Genoa": {pcs["Milan"], pcs["Genoa"]},
		"Genoa, Milan": {pcs["Genoa"], pcs["Milan"]},
	}
	seen := map[cacheKey]string{}
	for _, name := range slices.Sorted(maps.Keys(sets)) {
		for _, p := range []Platform{PlatformSEVSNP, PlatformEmulatedSEVSNP} {
			for _, signer := range []abi.ReportSigner{abi.VcekReportSigner, abi.VlekReportSigner} {
				k := snpChainKey(p, signer, report, "Milan", "", ek, sets[name])
				id := fmt.Sprintf("%s/%v/%v", name, p, signer)
				if other, ok := seen[k]; ok {
					t.Errorf("%s and %s share a key", id, other)
				}
				seen[k] = id
			}
		}
	}
	if snpChainKey(PlatformSEVSNP, abi.VcekReportSigner, report, "Milan", "", ek, sets["Milan"]) ==
		snpChainKey(PlatformSEVSNP, abi.VcekReportSigner, report, "Milan", "", []byte("another certificate"), sets["Milan"]) {
		t.Error("two endorsement key certificates share a key")
	}
}

func TestValidAt(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cert := func(from, until time.Time) *x509.Certificate {
		return &x509.Certificate{NotBefore: from, NotAfter: until}
	}
	chain := []*x509.Certificate{cert(t0, t0.Add(time.Hour)), cert(t0.Add(-time.Hour), t0.Add(2*time.Hour))}
	tests := []struct {
		name  string
		chain []*x509.Certificate
		now   time.Time
		want  bool
	}{
		{name: "inside", chain: chain, now: t0.Add(time.Minute), want: true},
		{name: "at NotBefore", chain: chain, now: t0, want: true},
		{name: "at NotAfter", chain: chain, now: t0.Add(time.Hour), want: true},
		{name: "before one certificate", chain: chain, now: t0.Add(-time.Minute)},
		{name: "after one certificate", chain: chain, now: t0.Add(90 * time.Minute)},
		{name: "empty chain", now: t0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := validAt(tt.chain, tt.now); got != tt.want {
				t.Errorf("validAt = %v, want %v", got, tt.want)
			}
		})
	}
}
