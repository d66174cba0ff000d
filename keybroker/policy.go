package keybroker

import (
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"sync"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/policy"
)

// PolicyGate verifies a tenant's signed migration policy and evaluates it on verified claims.
// The default (Config.Policy nil) is package policy's Verify, CheckRollback and Evaluate.
type PolicyGate interface {
	// Decide verifies signed with the tenant's registered key, refuses a policySvn below
	// lastSVN, and evaluates the policy on in. It returns an error only when the policy
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
	Host        Host
}

// PolicyDecision is a verified policy's identity and its decision.
type PolicyDecision struct {
	Digest  []byte
	SVN     uint64
	Allow   bool
	Reasons []string
	// ZeroPageElision is the policy's transport setting: the source may skip sending zero
	// pages (which reveals which pages are zero).
	ZeroPageElision bool
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
		ZeroPageElision: p.Spec.Transport.AllowZeroPageElision,
	}
	for _, r := range d.Reasons {
		out.Reasons = append(out.Reasons, r.Rule+": "+r.Message)
	}
	return out, nil
}
