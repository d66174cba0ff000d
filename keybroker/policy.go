package keybroker

import (
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/policy"
)

// PolicyGate verifies a tenant's signed migration policy and evaluates it on verified claims.
// The default (Config.Policy nil) is package policy's Verify, CheckRollback and Evaluate. The
// keybroker wraps every gate with the checks only it can make (tenantGate): the policy's
// selector covers the guest, and its policySvn is at least the floor the tenant published for
// the policy's name.
type PolicyGate interface {
	// Decide verifies signed with the tenant's registered key, refuses a policySvn below
	// lastSVN (a tenant-wide floor), and evaluates the policy on in. It returns an error only when the policy
	// itself is not acceptable (signature, parse, rollback, another tenant); a policy that
	// denies the migration is a PolicyDecision with Allow false and its reasons.
	Decide(signed []byte, tenantKey ed25519.PublicKey, lastSVN uint64, in PolicyInput) (*PolicyDecision, error)
}

// PolicyInput is what a policy is evaluated on.
type PolicyInput struct {
	Tenant string
	VM     string
	// Source is nil for an adoption (there is no source).
	Source      *attest.Claims
	Destination *attest.Claims
	Host        kbwire.Host
}

// PolicyDecision is a verified policy's identity and its decision.
type PolicyDecision struct {
	Digest []byte
	SVN    uint64
	// Name is the policy's metadata.name: floors are kept per (tenant, Name).
	Name string
	// Guests is the policy's selector (spec.guests, see policy.CoversGuest); a decision whose
	// Guests do not cover the guest is refused.
	Guests  []string
	Allow   bool
	Reasons []string
	// ZeroPageElision is the policy's transport setting: the source may skip sending zero
	// pages (which reveals which pages are zero).
	ZeroPageElision bool
	// MaxDowntime is the policy's downtime limit (spec.transport.maxDowntime); zero means the
	// tenant sets none.
	MaxDowntime time.Duration
	// PostCopy is the policy's spec.transport.allowPostCopy.
	PostCopy bool
}

// policyPackage is the PolicyGate of package policy. It remembers the last policies it
// verified, by the digest of the signed envelope and the key: verifying the same bytes with
// the same key always gives the same policy, and parsing (with its CEL compilation) is the
// costly part of a decision.
type policyPackage struct {
	mu       sync.Mutex
	verified map[[2][32]byte]*policy.Policy
}

// maxVerifiedPolicies bounds policyPackage's memory of verified policies.
const maxVerifiedPolicies = 256

func (g *policyPackage) verify(signed []byte, tenantKey ed25519.PublicKey) (*policy.Policy, error) {
	key := [2][32]byte{sha256.Sum256(signed), sha256.Sum256(tenantKey)}
	g.mu.Lock()
	p, ok := g.verified[key]
	g.mu.Unlock()
	if ok {
		return p, nil
	}
	p, err := policy.Verify(signed, tenantKey)
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	if g.verified == nil || len(g.verified) >= maxVerifiedPolicies {
		g.verified = map[[2][32]byte]*policy.Policy{}
	}
	g.verified[key] = p
	g.mu.Unlock()
	return p, nil
}

// Decide implements PolicyGate. A rollback error also matches policy.ErrRollback, a bad
// signature policy.ErrSignature.
func (g *policyPackage) Decide(signed []byte, tenantKey ed25519.PublicKey, lastSVN uint64, in PolicyInput) (*PolicyDecision, error) {
	p, err := g.verify(signed, tenantKey)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicyRejected, err)
	}
	if p.Metadata.Tenant != in.Tenant {
		return nil, fmt.Errorf("%w: the policy is tenant %q's, not %q's", ErrPolicyRejected, p.Metadata.Tenant, in.Tenant)
	}
	if err := policy.CheckRollback(p, lastSVN); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicyRejected, err)
	}
	host := policy.HostInfo{Labels: in.Host.Labels, Region: in.Host.Region}
	var d policy.Decision
	if in.Source == nil {
		d = policy.EvaluateAdoption(p, in.Destination, host)
	} else {
		d = policy.Evaluate(p, in.Source, in.Destination, host)
	}
	digest := p.Digest()
	out := &PolicyDecision{
		Digest: digest[:], SVN: p.Metadata.PolicySVN, Allow: d.Allow,
		Name: p.Metadata.Name, Guests: p.Spec.Guests,
		ZeroPageElision: p.Spec.Transport.AllowZeroPageElision,
		MaxDowntime:     p.Spec.Transport.MaxDowntime,
		PostCopy:        p.Spec.Transport.AllowPostCopy,
	}
	for _, r := range d.Reasons {
		out.Reasons = append(out.Reasons, r.Rule+": "+r.Message)
	}
	return out, nil
}

// tenantGate is the gate the keybroker decides with: the configured gate, then what only the
// tenant decides. The policy must select the guest (spec.guests), so that a policy the tenant
// signed for one guest never opens another; and its policySvn must be at least the floor of its
// (tenant, name), which only the tenant raises (PublishPolicy), so that a broker keeping an old
// policy cannot use it once the tenant published a newer one.
//
// Decide runs without I/O, after the request loaded the tenant's record (loadTenant, which every
// release, adoption and reissue does first): the floors are those loadTenant recorded in
// floors, at least what Vault held when the request began. A tenant whose record was not loaded
// is refused.
type tenantGate struct {
	inner  PolicyGate
	floors *floorCache
}

// Decide implements PolicyGate. Its refusals wrap ErrPolicyRejected (and policy.ErrRollback for
// a floor) and name the reason, which the caller's audit event carries.
func (g *tenantGate) Decide(signed []byte, tenantKey ed25519.PublicKey, lastSVN uint64, in PolicyInput) (*PolicyDecision, error) {
	dec, err := g.inner.Decide(signed, tenantKey, lastSVN, in)
	if err != nil {
		return nil, err
	}
	if len(dec.Guests) == 0 {
		return nil, fmt.Errorf("%w: policy %q covers no guest (spec.guests is empty), not %s", ErrPolicyRejected, dec.Name, in.VM)
	}
	if !policy.CoversGuest(dec.Guests, in.VM) {
		return nil, fmt.Errorf("%w: policy %q covers guests %q, not %s", ErrPolicyRejected, dec.Name, dec.Guests, in.VM)
	}
	floor, ok := g.floors.get(in.Tenant, dec.Name)
	if !ok {
		return nil, fmt.Errorf("%w: the floors of tenant %s are not loaded", ErrPolicyRejected, in.Tenant)
	}
	if dec.SVN < floor {
		return nil, fmt.Errorf("%w: %w: policySvn %d of policy %q is below %d, the floor tenant %s published", ErrPolicyRejected, policy.ErrRollback, dec.SVN, dec.Name, floor, in.Tenant)
	}
	return dec, nil
}
