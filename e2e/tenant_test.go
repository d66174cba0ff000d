package e2e

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/dsse"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
)

// tenantScenarios: only the tenant decides which guests a policy covers, when its rollback
// floor rises, and what its key is. Each attacker is the component itself: the broker (its
// NATS credentials, writing what it stores), the operator (holding the admin key), another
// tenant (holding its own key).
var tenantScenarios = []scenario{
	{"tenant/another-vms-policy-applied-by-the-broker", anotherVMsPolicy},
	{"tenant/stale-policy-kept-by-the-broker", stalePolicyKept},
	{"tenant/re-key-with-the-admin-credential-alone", adminReKey},
	{"tenant/key-rotation-signed-by-another-key", rotationByAnotherKey},
	{"tenant/key-rotation-signed-by-the-current-key", rotationByCurrentKey},
}

// tenantPolicy is the base policy renamed name, covering guests (a YAML flow list), at svn.
func (s *scn) tenantPolicy(name, guests string, svn int) []byte {
	y := replaceLine(s.basePolicy, "  name:", "  name: "+name)
	y = replaceLine(y, "  guests:", "  guests: "+guests)
	return withSVN(y, svn)
}

// brokerStores writes envelope as vm's policy in the broker's policies bucket, with the
// broker's own NATS credentials: what a broker (or an operator's policy apply) stores there is
// its choice.
func (s *scn) brokerStores(vm string, envelope []byte) {
	s.t.Helper()
	ctx := s.t.Context()
	kv, err := s.js.KeyValue(ctx, broker.PoliciesBucket)
	if err != nil {
		s.t.Fatal(err)
	}
	b, err := json.Marshal(broker.PolicyRecord{Tenant: demoTenant, VM: vm, Envelope: envelope, Applied: time.Now()})
	if err != nil {
		s.t.Fatal(err)
	}
	if _, err := kv.Put(ctx, broker.GuestKey(demoTenant, vm), b); err != nil {
		s.t.Fatalf("storing a policy as the broker: %v", err)
	}
	s.vmPolicies[vm] = true
}

// refusedMigration migrates vm from a to b and requires the keybroker to refuse the policy
// with a reason naming names.
func (s *scn) refusedMigration(vm string, a, b *agent, names string) {
	s.t.Helper()
	id := s.migrate(vm, b)
	m := s.requireEnd(id, vm, broker.OutcomeAborted, a, b)
	if !strings.Contains(m.AbortReason, "policy") || !strings.Contains(m.AbortReason, names) {
		s.t.Fatalf("abort reason %q; want the policy rejected for %q", m.AbortReason, names)
	}
	evs := s.audit.of(id)
	if !slices.ContainsFunc(evs, func(ev keybroker.Event) bool {
		return ev.Kind == keybroker.EventRelease && ev.Decision == keybroker.DecisionDeny && strings.Contains(strings.Join(ev.Reasons, " "), names)
	}) {
		s.t.Errorf("no release denial audited with a reason naming %q: %+v", names, evs)
	}
}

// tenantEvent reports whether the keybroker audited an event of kind for tenant with decision.
func (s *scn) tenantEvent(kind keybroker.EventKind, tenant string, d keybroker.Decision) bool {
	s.audit.mu.Lock()
	defer s.audit.mu.Unlock()
	return slices.ContainsFunc(s.audit.events, func(ev keybroker.Event) bool {
		return ev.Kind == kind && ev.Tenant == tenant && ev.Decision == d && (d == keybroker.DecisionAllow || len(ev.Reasons) > 0)
	})
}

// anotherVMsPolicy: the tenant signed a sandbox policy for its sandbox guests; the broker
// stores it as the production guest's policy. The keybroker refuses it for that guest.
func anotherVMsPolicy(s *scn) {
	vm := s.vm("g")
	a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
	s.adopt(vm, a)
	sandbox := s.sign(s.tenantPolicy(s.vm("sandbox"), fmt.Sprintf("[%q]", s.vm("sandbox-*")), 1), s.demoKey)
	s.brokerStores(vm, sandbox)
	s.refusedMigration(vm, a, b, "not "+vm)
	s.outcome = "aborted: keybroker refused a policy whose spec.guests does not cover the guest"
}

// stalePolicyKept: the tenant publishes policySvn 2 of its guest's policy to the keybroker;
// the broker keeps policySvn 1. The keybroker refuses it at release.
func stalePolicyKept(s *scn) {
	ctx := s.t.Context()
	vm := s.vm("g")
	a, b := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase))
	s.adopt(vm, a)
	name := s.vm("pinned")
	if err := s.policy(vm, s.tenantPolicy(name, fmt.Sprintf("[%q]", vm), 1)); err != nil {
		s.t.Fatalf("applying policySvn 1: %v", err)
	}
	// The tenant raises the floor; the broker never stores the new policy.
	resp, err := s.kb.PublishPolicy(ctx, &kbwire.PublishPolicyRequest{Policy: s.sign(s.tenantPolicy(name, fmt.Sprintf("[%q]", vm), 2), s.demoKey)})
	if err != nil || resp.Floor != 2 {
		s.t.Fatalf("publishing policySvn 2: %+v, %v", resp, err)
	}
	if !s.tenantEvent(keybroker.EventPublishPolicy, demoTenant, keybroker.DecisionAllow) {
		s.t.Errorf("no publish-policy audit event")
	}
	s.refusedMigration(vm, a, b, "rollback")
	s.outcome = "aborted: keybroker refused the policySvn 1 the broker kept after the tenant published 2"
}

// adminReKey: the operator, holding the admin key, registers another key for tenant demo
// (and replays an admin request it saw). Both are refused; demo's key stays (the liveness
// probe of the next scenarios migrates under it).
func adminReKey(s *scn) {
	ctx := s.t.Context()
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	_, err := s.kb.RegisterTenant(ctx, s.adminRequest(kbwire.RegisterTenantRequest{Tenant: demoTenant, PolicyKey: pub}))
	if !errors.Is(err, keybroker.ErrUnauthorized) {
		s.t.Fatalf("the admin re-keyed tenant demo: %v, want ErrUnauthorized", err)
	}
	if !s.tenantEvent(keybroker.EventTenantRegister, demoTenant, keybroker.DecisionDeny) {
		s.t.Errorf("the refused re-key was not audited")
	}
	// An admin request is used once: one captured on its way is worth nothing.
	fresh := s.adminRequest(kbwire.RegisterTenantRequest{Tenant: fmt.Sprintf("t%02d", s.index), PolicyKey: pub})
	if _, err := s.kb.RegisterTenant(ctx, fresh); err != nil {
		s.t.Fatalf("registering a new tenant: %v", err)
	}
	if _, err := s.kb.RegisterTenant(ctx, fresh); !errors.Is(err, keybroker.ErrUnauthorized) {
		s.t.Fatalf("a replayed admin request: %v, want ErrUnauthorized", err)
	}
	s.outcome = "refused: the admin cannot re-key a tenant, and an admin request is used once"
}

// rotationByAnotherKey: tenant other signs a rotation of demo's key to its own key.
func rotationByAnotherKey(s *scn) {
	signed, err := kbwire.SignRotation(&kbwire.KeyRotation{
		Tenant: demoTenant, CurrentKeyID: dsse.KeyID(s.demoKey.Public().(ed25519.PublicKey)),
		NewKey: s.otherKey.Public().(ed25519.PublicKey), IssuedAt: time.Now(),
	}, s.otherKey)
	if err != nil {
		s.t.Fatal(err)
	}
	if _, err := s.kb.RotateKey(s.t.Context(), &kbwire.RotateKeyRequest{Signed: signed}); !errors.Is(err, keybroker.ErrUnauthorized) {
		s.t.Fatalf("a rotation signed by another tenant's key: %v, want ErrUnauthorized", err)
	}
	if !s.tenantEvent(keybroker.EventRotateKey, demoTenant, keybroker.DecisionDeny) {
		s.t.Errorf("the refused rotation was not audited")
	}
	s.outcome = "refused: a rotation not signed by the tenant's current key"
}

// rotationByCurrentKey: the tenant rotates its key with a statement of the current key. The
// broker's policies signed by the old key are refused from then on; the new key's are
// accepted. The suite goes on with the new key.
func rotationByCurrentKey(s *scn) {
	ctx := s.t.Context()
	vm := s.vm("g")
	a, b, c := s.agent(snp(snpBase, vm)), s.agent(snp(snpBase)), s.agent(snp(snpBase))
	s.adopt(vm, a)
	newPub, newKey, _ := ed25519.GenerateKey(rand.Reader)
	signed, err := kbwire.SignRotation(&kbwire.KeyRotation{
		Tenant: demoTenant, CurrentKeyID: dsse.KeyID(s.demoKey.Public().(ed25519.PublicKey)), NewKey: newPub, IssuedAt: time.Now(),
	}, s.demoKey)
	if err != nil {
		s.t.Fatal(err)
	}
	if _, err := s.kb.RotateKey(ctx, &kbwire.RotateKeyRequest{Signed: signed}); err != nil {
		s.t.Fatalf("rotation signed by the current key: %v", err)
	}
	if !s.tenantEvent(keybroker.EventRotateKey, demoTenant, keybroker.DecisionAllow) {
		s.t.Errorf("the rotation was not audited")
	}
	// The tenant-wide policy the broker holds is the old key's.
	s.refusedMigration(vm, a, b, "signature")

	// The new key's policy for the guest is accepted.
	s.demoKey = newKey
	if err := s.policy(vm, s.basePolicy); err != nil {
		s.t.Fatalf("applying the new key's policy: %v", err)
	}
	id := s.migrate(vm, c)
	s.requireEnd(id, vm, broker.OutcomeErased, a, c)

	// The suite goes on under the new key: the tenant re-signs and applies its tenant-wide
	// policy.
	if _, err := s.demo.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Envelope: s.sign(s.basePolicy, s.demoKey)}); err != nil {
		s.t.Fatalf("re-applying the tenant-wide policy under the new key: %v", err)
	}
	// A replay of the rotation (its key is retired) changes nothing.
	if _, err := s.kb.RotateKey(ctx, &kbwire.RotateKeyRequest{Signed: signed}); !errors.Is(err, keybroker.ErrUnauthorized) {
		s.t.Errorf("a replayed rotation: %v, want ErrUnauthorized", err)
	}
	s.outcome = "rotated: the old key's policy refused (aborted), the new key's committed"
}
