package keybroker

import (
	"bytes"
	"encoding/json"
	"errors"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/policy"
)

func TestReleaseAllowed(t *testing.T) {
	e := newEnv(t)
	adopted := e.adopt("vm1")
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))

	resp, err := e.kb.Release(t.Context(), m.req)
	if err != nil {
		t.Fatalf("Release: %v", err)
	}
	if resp.FromEpoch != 1 || resp.ToEpoch != 2 {
		t.Errorf("epochs %d -> %d, want 1 -> 2", resp.FromEpoch, resp.ToEpoch)
	}

	srcKeys, err := m.src.key.Open("m1", attest.RoleSource, resp.SealedSource)
	if err != nil {
		t.Fatalf("source opening its keys: %v", err)
	}
	dstKeys, err := m.dst.key.Open("m1", attest.RoleDestination, resp.SealedDestination)
	if err != nil {
		t.Fatalf("destination opening its keys: %v", err)
	}
	if len(srcKeys.TK) != seal.KeySize || !bytes.Equal(srcKeys.TK, dstKeys.TK) {
		t.Errorf("source and destination hold different transfer keys")
	}
	if srcKeys.MDK != nil {
		t.Errorf("the source received a memory data key")
	}
	if len(dstKeys.MDK) != seal.KeySize || dstKeys.Epoch != 2 {
		t.Errorf("destination MDK of %d bytes for epoch %d, want %d bytes for epoch 2", len(dstKeys.MDK), dstKeys.Epoch, seal.KeySize)
	}
	// The grant is signed by the keybroker's key and authorizes exactly these blobs, to
	// exactly these ends, at the attested endpoint.
	pub, err := e.kb.PublicKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, end := range []struct {
		role   attest.Role
		host   string
		att    kbwire.Attestation
		sealed []byte
	}{
		{attest.RoleSource, "host-a", m.req.Source, resp.SealedSource},
		{attest.RoleDestination, "host-b", m.req.Destination, resp.SealedDestination},
	} {
		g, err := grant.Check(resp.Grant, pub, grant.Expectation{
			Op: grant.OpRelease, MigrationID: "m1", Role: end.role, Tenant: "demo", VM: "vm1", Host: end.host,
			HPKEPublicKey: end.att.Evidence.HPKEPublicKey, Nonce: end.att.Nonce, Sealed: end.sealed, Epoch: 1,
		})
		if err != nil {
			t.Fatalf("the %s's grant: %v", end.role, err)
		}
		if g.DataEndpoint != keybrokertest.DataEndpoint || resp.DataEndpoint != keybrokertest.DataEndpoint {
			t.Errorf("grant names endpoint %q (response %q), the destination attested %q", g.DataEndpoint, resp.DataEndpoint, keybrokertest.DataEndpoint)
		}
	}
	if _, err := grant.Check(resp.Grant, pub, grant.Expectation{
		Op: grant.OpRelease, MigrationID: "m1", Role: attest.RoleSource, Tenant: "demo", VM: "vm1", Host: "host-a",
		HPKEPublicKey: m.req.Source.Evidence.HPKEPublicKey, Nonce: m.req.Source.Nonce, Sealed: resp.SealedDestination,
	}); !errors.Is(err, grant.ErrRefused) {
		t.Errorf("the destination's blob passed as the source's: %v", err)
	}

	// Each blob opens only for its own role and migration.
	if _, err := m.dst.key.Open("m1", attest.RoleDestination, resp.SealedSource); !errors.Is(err, seal.ErrOpen) {
		t.Errorf("destination opened the source's blob: %v", err)
	}
	if _, err := m.dst.key.Open("m2", attest.RoleDestination, resp.SealedDestination); !errors.Is(err, seal.ErrOpen) {
		t.Errorf("blob opened for another migration: %v", err)
	}

	// Vault: both keys exist, never exportable; the wrapped MDK unwraps to the sealed one.
	for _, name := range []string{"lethe-demo-vm1-e2", "lethe-mig-m1"} {
		s, err := e.admin.Logical().ReadWithContext(t.Context(), "transit/keys/"+name)
		if err != nil || s == nil {
			t.Fatalf("reading %s: %v", name, err)
		}
		if s.Data["exportable"] != false || s.Data["allow_plaintext_backup"] != false || s.Data["type"] != "aes256-gcm96" {
			t.Errorf("%s: exportable=%v allow_plaintext_backup=%v type=%v", name, s.Data["exportable"], s.Data["allow_plaintext_backup"], s.Data["type"])
		}
	}
	pt, err := e.kb.keys.decrypt(t.Context(), "lethe-demo-vm1-e2", resp.WrappedMDK)
	if err != nil || !bytes.Equal(pt, dstKeys.MDK) {
		t.Errorf("wrapped MDK_2 does not unwrap to the sealed one (err %v)", err)
	}
	if adopted.WrappedMDK == resp.WrappedMDK {
		t.Errorf("MDK_2 is MDK_1")
	}

	ev := e.audit.last(t)
	srcD, dstD := m.req.Source.Evidence.Digest(), m.req.Destination.Evidence.Digest()
	want := Event{
		Schema: AuditSchema, Kind: EventRelease, MigrationID: "m1", Tenant: "demo", VM: "vm1", Host: "host-b", Decision: DecisionAllow,
		SourceEvidence: srcD[:], DestinationEvidence: dstD[:], PolicyDigest: resp.PolicyDigest, PolicySVN: 1, Epoch: 2,
	}
	if diff := cmp.Diff(want, ev, cmpIgnoreTime); diff != "" {
		t.Errorf("audit event (-want +got):\n%s", diff)
	}
	assertNoSecrets(t, e, [][]byte{srcKeys.TK, dstKeys.MDK})
}

var cmpIgnoreTime = cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".Time" }, cmp.Ignore())

// assertNoSecrets checks that no audit event carries a key, the Vault token or raw evidence.
func assertNoSecrets(t *testing.T, e *env, keys [][]byte) {
	t.Helper()
	b, err := json.Marshal(e.audit.all())
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	if strings.Contains(s, e.vault.Token) {
		t.Errorf("an audit event carries a token")
	}
	for _, k := range keys {
		kb, _ := json.Marshal(k)
		if strings.Contains(s, strings.Trim(string(kb), `"`)) || strings.Contains(s, attest.HexBytes(k).String()) {
			t.Errorf("an audit event carries a key")
		}
	}
}

func TestReleaseDeniedByPolicy(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	before := e.transitKeys()
	m := e.newMigration("m1", "vm1", "weak", e.signedPolicy(1, nil))

	_, err := e.kb.Release(t.Context(), m.req)
	if !errors.Is(err, ErrDenied) {
		t.Fatalf("Release = %v, want ErrDenied", err)
	}
	ev := e.audit.last(t)
	if ev.Decision != DecisionDeny || ev.Schema != AuditSchema || ev.Kind != EventRelease || len(ev.PolicyDigest) == 0 {
		t.Errorf("audit event %+v, want a release denial with the policy digest", ev)
	}
	if !slices.ContainsFunc(ev.Reasons, func(r string) bool {
		return strings.HasPrefix(r, "destinationTcbAtLeastSource") && strings.Contains(r, "microcode")
	}) {
		t.Errorf("audit reasons %q do not name the failing TCB rule", ev.Reasons)
	}
	if diff := cmp.Diff(before, e.transitKeys()); diff != "" {
		t.Errorf("a denial changed Vault's keys (-before +after):\n%s", diff)
	}
}

func TestReleaseNonces(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	e.adopt("vm2")

	t.Run("replayed", func(t *testing.T) {
		m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
		if _, err := e.kb.Release(t.Context(), m.req); err != nil {
			t.Fatal(err)
		}
		_, err := e.kb.Release(t.Context(), m.req)
		if !errors.Is(err, ErrNonceUsed) {
			t.Fatalf("replayed Release = %v, want ErrNonceUsed", err)
		}
		if ev := e.audit.last(t); ev.Decision != DecisionDeny {
			t.Errorf("replay audited as %q, want deny", ev.Decision)
		}
	})
	t.Run("expired", func(t *testing.T) {
		m := e.newMigration("m2", "vm2", "destination", e.signedPolicy(1, nil))
		e.clock.Advance(61 * time.Second)
		_, err := e.kb.Release(t.Context(), m.req)
		if !errors.Is(err, ErrNonceExpired) {
			t.Fatalf("Release after the TTL = %v, want ErrNonceExpired", err)
		}
	})
	t.Run("unknown", func(t *testing.T) {
		m := e.newMigration("m3", "vm2", "destination", e.signedPolicy(1, nil))
		m.req.Source.Nonce = bytes.Repeat([]byte{7}, attest.NonceSize)
		_, err := e.kb.Release(t.Context(), m.req)
		if !errors.Is(err, ErrNonceUnknown) {
			t.Fatalf("Release with a nonce never issued = %v, want ErrNonceUnknown", err)
		}
	})
}

func TestReleaseWrongBinding(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	tests := map[string]func(t *testing.T, m *migration){
		"evidence of another migration": func(t *testing.T, m *migration) {
			// Evidence made for migration "other" is presented, with m's nonce, for m.
			other := e.attest("destination", "other", attest.RoleDestination, keybrokertest.CleanStatement(t))
			m.req.Destination.Evidence = other.att.Evidence
		},
		"another HPKE key": func(t *testing.T, m *migration) {
			// A relay swaps in its own key: the evidence no longer binds the key it carries.
			k, _ := seal.GenerateKey()
			ev := *m.req.Destination.Evidence
			ev.HPKEPublicKey = k.PublicKey()
			m.req.Destination.Evidence = &ev
		},
		"another role": func(t *testing.T, m *migration) {
			// The source's evidence presented as the destination's.
			ev := *m.req.Source.Evidence
			m.req.Destination.Evidence = &ev
		},
		"another statement": func(t *testing.T, m *migration) {
			ev := *m.req.Destination.Evidence
			ev.Statement = json.RawMessage(`{"bytes":1,"type":"lethe.dev/clean-memory/v1","verifiedZero":true,"zeroed":true}`)
			m.req.Destination.Evidence = &ev
		},
	}
	i := 0
	for name, tamper := range tests {
		t.Run(name, func(t *testing.T) {
			i++
			id := "mb" + string(rune('0'+i))
			m := e.newMigration(id, "vm1", "destination", e.signedPolicy(1, nil))
			tamper(t, m)
			_, err := e.kb.Release(t.Context(), m.req)
			if !errors.Is(err, ErrEvidenceRejected) || attest.ReasonOf(err) != attest.ReasonBinding {
				t.Fatalf("Release = %v, want ErrEvidenceRejected for the binding", err)
			}
			if ev := e.audit.last(t); ev.Decision != DecisionDeny || len(ev.Reasons) == 0 {
				t.Errorf("audit event %+v, want a denial with reasons", ev)
			}
		})
	}
	if slices.ContainsFunc(e.transitKeys(), func(k string) bool { return strings.HasPrefix(k, "lethe-mig-") }) {
		t.Errorf("a rejected release created a migration key: %v", e.transitKeys())
	}
}

func TestReleasePolicyRollback(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	e.adopt("vm2")
	// The tenant publishes policySvn 3: the floor of its policy's name (floors rise only then).
	if _, err := e.kb.PublishPolicy(t.Context(), &kbwire.PublishPolicyRequest{Policy: e.signedPolicy(3, nil)}); err != nil {
		t.Fatal(err)
	}
	m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(3, nil))
	if _, err := e.kb.Release(t.Context(), m.req); err != nil {
		t.Fatal(err)
	}
	m2 := e.newMigration("m2", "vm2", "destination", e.signedPolicy(2, nil))
	_, err := e.kb.Release(t.Context(), m2.req)
	if !errors.Is(err, ErrPolicyRejected) || !errors.Is(err, policy.ErrRollback) {
		t.Fatalf("Release under policySvn 2 after 3 = %v, want ErrPolicyRejected and policy.ErrRollback", err)
	}
	if ev := e.audit.last(t); ev.Decision != DecisionDeny {
		t.Errorf("rollback audited as %q", ev.Decision)
	}

	// A policy signed by another key is refused too.
	m3 := e.newMigration("m3", "vm2", "destination", e.signedPolicy(3, nil))
	penv, err := policy.ParseEnvelope(m3.req.Policy)
	if err != nil {
		t.Fatal(err)
	}
	penv.Payload = bytes.Replace(penv.Payload, []byte("policySvn: 3"), []byte("policySvn: 9"), 1)
	if m3.req.Policy, err = penv.Marshal(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.Release(t.Context(), m3.req); !errors.Is(err, ErrPolicyRejected) || !errors.Is(err, policy.ErrSignature) {
		t.Fatalf("Release under an altered policy = %v, want ErrPolicyRejected", err)
	}
}

func TestReleaseVaultDown(t *testing.T) {
	e := newEnv(t)
	e.adopt("vm1")
	before := e.transitKeys()

	t.Run("unreachable", func(t *testing.T) {
		m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
		e.proxy.Cut()
		_, err := e.kb.Release(t.Context(), m.req)
		e.proxy.Restore()
		if !errors.Is(err, ErrVaultUnavailable) {
			t.Fatalf("Release with Vault down = %v, want ErrVaultUnavailable", err)
		}
		if ev := e.audit.last(t); ev.Decision != DecisionError {
			t.Errorf("audited as %q, want error", ev.Decision)
		}
	})
	t.Run("fails after the keys exist", func(t *testing.T) {
		m := e.newMigration("m2", "vm1", "destination", e.signedPolicy(1, nil))
		// Vault fails once the keys are created: drawing data keys.
		e.proxy.Block(func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/transit/datakey/") })
		_, err := e.kb.Release(t.Context(), m.req)
		e.proxy.Restore()
		if !errors.Is(err, ErrVaultUnavailable) {
			t.Fatalf("Release = %v, want ErrVaultUnavailable", err)
		}
	})
	if diff := cmp.Diff(before, e.transitKeys()); diff != "" {
		t.Errorf("failed releases left keys behind (-before +after):\n%s", diff)
	}
	if g := e.guest("vm1"); g.Migration != nil || g.Epoch != 1 {
		t.Errorf("guest record after failed releases: %+v", g)
	}
	// The guest is free for the next attempt.
	m := e.newMigration("m3", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), m.req); err != nil {
		t.Fatalf("Release after Vault came back: %v", err)
	}
}
