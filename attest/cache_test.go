package attest_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-sev-guest/abi"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// testClock is a settable Config.Now.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// errText is err's message, or "" for nil.
func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// checkSameAsCold verifies ev with warm, whose cache has seen the evidence's chain, and with a
// new verifier of the same configuration, and fails unless both give the same result with
// the expected reason ("" for success).
func checkSameAsCold(t *testing.T, warm *attest.Verifier, cfg attest.Config, ev *attest.Evidence, want attest.Expectation, reason attest.Reason) {
	t.Helper()
	_, warmErr := warm.Verify(t.Context(), ev, want)
	_, coldErr := newTestVerifier(t, cfg).Verify(t.Context(), ev, want)
	if got := attest.ReasonOf(warmErr); got != reason || (reason == "" && warmErr != nil) {
		t.Errorf("Verify with a warm cache: reason %q, error %v; want reason %q", got, warmErr, reason)
	}
	if diff := cmp.Diff(errText(coldErr), errText(warmErr)); diff != "" {
		t.Errorf("Verify with a warm cache and a cold one differ (-cold +warm):\n%s", diff)
	}
}

// warmUp verifies ev twice with v and fails unless the second verification found its chain in
// the cache.
func warmUp(t *testing.T, v *attest.Verifier, ev *attest.Evidence, want attest.Expectation) {
	t.Helper()
	for range 2 {
		if _, err := v.Verify(t.Context(), ev, want); err != nil {
			t.Fatalf("Verify: %v", err)
		}
	}
	if s := attest.SNPCacheStats(v); s.ChainHits == 0 {
		t.Fatalf("a repeated verification did not use the cache: %+v", s)
	}
}

// TestSNPCacheHitRejects checks that evidence whose chain the cache knows is still rejected
// for everything that is not the chain, exactly as a verifier with a cold cache rejects it.
func TestSNPCacheHitRejects(t *testing.T) {
	base := baseSNP(t)
	other, err := otherSNP()
	if err != nil {
		t.Fatal(err)
	}
	ev := produceEvidence(t, base, snpBinding)
	otherEv := produceEvidence(t, other, snpBinding)
	cfg := attest.Config{Roots: []attest.Roots{base.Roots()}}
	warm := newTestVerifier(t, cfg)
	want := attest.Expectation{Binding: &snpBinding}
	warmUp(t, warm, ev, want)

	tests := []struct {
		name   string
		ev     *attest.Evidence
		want   attest.Expectation
		reason attest.Reason
	}{
		{name: "cached", ev: ev, want: want},
		{name: "flipped measurement byte", ev: withRawBytes(ev, func(b []byte) []byte { b[0x90] ^= 1; return b }), want: want, reason: attest.ReasonSignature},
		{name: "flipped report data byte", ev: withRawBytes(ev, func(b []byte) []byte { b[0x50] ^= 1; return b }), want: want, reason: attest.ReasonSignature},
		{name: "flipped signature byte", ev: withRawBytes(ev, func(b []byte) []byte { b[0x2a0+3] ^= 0x80; return b }), want: want, reason: attest.ReasonSignature},
		{name: "report of another VCEK with the cached chain", ev: withRawBytes(ev, func(b []byte) []byte {
			return append(bytes.Clone(otherEv.Raw[:abi.ReportSize]), b[abi.ReportSize:]...)
		}), want: want, reason: attest.ReasonSignature},
		{name: "wrong binding", ev: ev, want: attest.Expectation{Binding: &attest.Binding{MigrationID: "mig-0002", Role: attest.RoleDestination, Nonce: snpBinding.Nonce}}, reason: attest.ReasonBinding},
		{name: "another platform's evidence", ev: otherEv, want: want, reason: attest.ReasonChain},
		{name: "cached again", ev: ev, want: want},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkSameAsCold(t, warm, cfg, tt.ev, tt.want, tt.reason)
		})
	}
}

// TestSNPCacheExpiry moves the clock after a first success: certificates that expire, or are
// not yet valid, are rejected though their chain is cached, and accepted again when the clock
// comes back.
func TestSNPCacheExpiry(t *testing.T) {
	start := time.Now()
	p, dir := snpVariant(t, emulate.Options{})
	roots, err := attest.LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	ev := produceEvidence(t, p, snpBinding)
	vcek, ask, ark := snpCerts(t, ev.Raw, roots[0])

	// The same ASK key, certified for two days only, so that the ASK expires while the VCEK
	// is still valid.
	tmpl := *ask
	tmpl.NotBefore, tmpl.NotAfter = start.Add(-time.Hour), start.Add(48*time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, ark, ask.PublicKey, readARKKey(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ark.Raw})...)
	shortRoots := attest.Roots{Platform: attest.PlatformEmulatedSEVSNP, Certificates: map[string][]byte{"Milan": chain}}

	for _, tc := range []struct {
		name  string
		roots attest.Roots
		// askReason is the rejection while the clock is outside the ASK's validity only.
		askReason attest.Reason
	}{
		{name: "emulated roots", roots: roots[0]},
		{name: "short-lived ASK", roots: shortRoots, askReason: attest.ReasonExpired},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := &testClock{t: start}
			cfg := attest.Config{Roots: []attest.Roots{tc.roots}, Now: clock.Now}
			warm := newTestVerifier(t, cfg)
			want := attest.Expectation{Binding: &snpBinding}
			warmUp(t, warm, ev, want)

			steps := []struct {
				name   string
				now    time.Time
				reason attest.Reason
			}{
				{name: "valid", now: start},
				{name: "ASK expired", now: start.Add(72 * time.Hour), reason: tc.askReason},
				{name: "ASK not yet valid", now: start.Add(-2 * time.Hour), reason: tc.askReason},
				{name: "valid again", now: start.Add(time.Hour)},
				{name: "VCEK expired", now: vcek.NotAfter.Add(time.Second), reason: attest.ReasonExpired},
				{name: "VCEK not yet valid", now: vcek.NotBefore.Add(-time.Second), reason: attest.ReasonExpired},
				{name: "valid at last", now: start},
			}
			for _, s := range steps {
				clock.Set(s.now)
				t.Run(s.name, func(t *testing.T) {
					checkSameAsCold(t, warm, cfg, ev, want, s.reason)
				})
			}
		})
	}
}

// TestSNPCacheRevocation changes the CRL in the collateral directory after a first success:
// each verification reads the CRL then current.
func TestSNPCacheRevocation(t *testing.T) {
	start := time.Now()
	p, dir := snpVariant(t, emulate.Options{})
	roots, err := attest.LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	arkKey := readARKKey(t, dir)
	otherKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ev := produceEvidence(t, p, snpBinding)
	vcek, ask, ark := snpCerts(t, ev.Raw, roots[0])
	collateral := t.TempDir()
	writeCRL(t, collateral, ark, arkKey, start.Add(24*time.Hour))

	clock := &testClock{t: start}
	// The emulator's collateral is read from collateral, where the test writes its CRLs.
	roots[0].CollateralDir = collateral
	cfg := attest.Config{Roots: roots, CheckRevocations: true, Now: clock.Now}
	warm := newTestVerifier(t, cfg)
	want := attest.Expectation{Binding: &snpBinding}
	warmUp(t, warm, ev, want)
	if s := attest.SNPCacheStats(warm); s.CRLHits == 0 {
		t.Fatalf("a repeated revocation check did not use the cache: %+v", s)
	}

	steps := []struct {
		name   string
		crl    func()
		now    time.Time
		reason attest.Reason
	}{
		{name: "VCEK revoked", crl: func() { writeCRL(t, collateral, ark, arkKey, start.Add(24*time.Hour), vcek.SerialNumber) }, reason: attest.ReasonRevoked},
		{name: "ASK revoked", crl: func() { writeCRL(t, collateral, ark, arkKey, start.Add(24*time.Hour), ask.SerialNumber) }, reason: attest.ReasonRevoked},
		{name: "CRL not signed by the ARK", crl: func() { writeCRL(t, collateral, ark, otherKey, start.Add(24*time.Hour)) }, reason: attest.ReasonCollateral},
		{name: "CRL garbled", crl: func() { writeCollateralDoc(t, collateral, ark.CRLDistributionPoints[0], []byte("not a CRL")) }, reason: attest.ReasonCollateral},
		{name: "revokes nothing", crl: func() { writeCRL(t, collateral, ark, arkKey, start.Add(24*time.Hour)) }},
		{name: "same CRL, past its next update", now: start.Add(48 * time.Hour), reason: attest.ReasonExpired},
		{name: "same CRL, fresh again"},
		{name: "VCEK revoked again", crl: func() { writeCRL(t, collateral, ark, arkKey, start.Add(24*time.Hour), vcek.SerialNumber) }, reason: attest.ReasonRevoked},
	}
	for _, s := range steps {
		if s.crl != nil {
			s.crl()
		}
		now := s.now
		if now.IsZero() {
			now = start
		}
		clock.Set(now)
		t.Run(s.name, func(t *testing.T) {
			checkSameAsCold(t, warm, cfg, ev, want, s.reason)
		})
	}
}

// TestSNPCacheRoots checks that evidence chaining to one root is never accepted on the
// strength of another root's entries, and that each root's chains have entries of their own.
func TestSNPCacheRoots(t *testing.T) {
	a := baseSNP(t)
	b, err := otherSNP()
	if err != nil {
		t.Fatal(err)
	}
	evA, evB := produceEvidence(t, a, snpBinding), produceEvidence(t, b, snpBinding)
	mixed := withRawBytes(evA, func(raw []byte) []byte {
		return append(bytes.Clone(evB.Raw[:abi.ReportSize]), raw[abi.ReportSize:]...)
	})
	want := attest.Expectation{Binding: &snpBinding}

	onlyA := attest.Config{Roots: []attest.Roots{a.Roots()}}
	vA := newTestVerifier(t, onlyA)
	warmUp(t, vA, evA, want)
	checkSameAsCold(t, vA, onlyA, evB, want, attest.ReasonChain)
	// The same bytes named real SEV-SNP verify against AMD's roots, which the cached entry
	// for the emulator's roots says nothing about.
	checkSameAsCold(t, vA, onlyA, &attest.Evidence{Platform: attest.PlatformSEVSNP, Raw: evA.Raw}, want, attest.ReasonChain)

	for _, tc := range []struct {
		name  string
		roots []attest.Roots
	}{
		{name: "A then B", roots: []attest.Roots{a.Roots(), b.Roots()}},
		{name: "B then A", roots: []attest.Roots{b.Roots(), a.Roots()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := attest.Config{Roots: tc.roots}
			v := newTestVerifier(t, cfg)
			warmUp(t, v, evA, want)
			warmUp(t, v, evB, want)
			got := attest.SNPCacheStats(v)
			if got.ChainEntries != 2 || got.ChainHits != 2 {
				t.Errorf("cache after two verifications of each platform's evidence: %+v, want 2 entries and 2 hits", got)
			}
			checkSameAsCold(t, v, cfg, mixed, want, attest.ReasonSignature)
			checkSameAsCold(t, v, cfg, evA, want, "")
			checkSameAsCold(t, v, cfg, evB, want, "")
		})
	}
}

// TestSNPCacheRootOrder configures two roots for one product line whose ASKs certify the same
// key: the first becomes valid only later. Which root a chain ends at then depends on the
// time, and so does revocation (the CRL revokes the first ASK only): the cache must not keep
// answering with the root it found first.
func TestSNPCacheRootOrder(t *testing.T) {
	start := time.Now()
	p, dir := snpVariant(t, emulate.Options{})
	roots, err := attest.LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	arkKey := readARKKey(t, dir)
	ev := produceEvidence(t, p, snpBinding)
	_, ask, ark := snpCerts(t, ev.Raw, roots[0])

	tmpl := *ask
	tmpl.SerialNumber = new(big.Int).Add(ask.SerialNumber, big.NewInt(1))
	tmpl.NotBefore, tmpl.NotAfter = start.Add(time.Hour), start.Add(48*time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, ark, ask.PublicKey, arkKey)
	if err != nil {
		t.Fatal(err)
	}
	chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ark.Raw})...)
	later := attest.Roots{Platform: attest.PlatformEmulatedSEVSNP, Certificates: map[string][]byte{"Milan": chain}}

	collateral := t.TempDir()
	writeCRL(t, collateral, ark, arkKey, start.Add(24*time.Hour), tmpl.SerialNumber)
	clock := &testClock{t: start}
	later.CollateralDir, roots[0].CollateralDir = collateral, collateral
	cfg := attest.Config{Roots: []attest.Roots{later, roots[0]}, CheckRevocations: true, Now: clock.Now}
	warm := newTestVerifier(t, cfg)
	want := attest.Expectation{Binding: &snpBinding}
	steps := []struct {
		name   string
		now    time.Time
		reason attest.Reason
	}{
		{name: "second root", now: start},
		{name: "second root again", now: start},
		{name: "first root valid, its ASK revoked", now: start.Add(2 * time.Hour), reason: attest.ReasonRevoked},
		{name: "second root at last", now: start},
	}
	for _, s := range steps {
		clock.Set(s.now)
		t.Run(s.name, func(t *testing.T) {
			checkSameAsCold(t, warm, cfg, ev, want, s.reason)
		})
	}
}
