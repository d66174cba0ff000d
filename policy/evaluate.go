package policy

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
)

// ErrDenied is matched (errors.Is) by Decision.Err for a denial.
var ErrDenied = errors.New("denied by policy")

// HostInfo is what the broker's host registry says about the destination host. It is not
// attested: a policy's host rules constrain where the provider may place a guest, the
// claims constrain what the host is.
type HostInfo struct {
	Labels map[string]string `json:"labels,omitempty"`
	Region string            `json:"region,omitempty"`
}

// Reason is one failed rule.
type Reason struct {
	// Rule names the rule, such as "destination.platform", "destinationTcbAtLeastSource",
	// "destination.snp.tcb.microcode" or "cel".
	Rule string `json:"rule"`
	// Message says what failed, with the values involved.
	Message string `json:"message"`
}

// Decision is the outcome of an evaluation. The zero value denies.
type Decision struct {
	// Allow is true only if every rule passed.
	Allow bool `json:"allow"`
	// Reasons lists every failed rule; empty when Allow is true.
	Reasons []Reason `json:"reasons,omitempty"`
}

// Err returns nil for an allow, and otherwise an error matching ErrDenied that lists every
// reason.
func (d Decision) Err() error {
	if d.Allow {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrDenied, d.String())
}

// String returns "allow" or each reason's message, separated by "; ".
func (d Decision) String() string {
	if d.Allow {
		return "allow"
	}
	if len(d.Reasons) == 0 {
		return "deny"
	}
	msgs := make([]string, len(d.Reasons))
	for i, r := range d.Reasons {
		msgs[i] = r.Message
	}
	return strings.Join(msgs, "; ")
}

// evaluation collects reasons.
type evaluation struct {
	reasons []Reason
	// check evaluates baseline requirements; (*attest.Claims).Check outside tests.
	check func(*attest.Claims, attest.Requirements) error
}

func (e *evaluation) deny(rule, format string, args ...any) {
	e.reasons = append(e.reasons, Reason{Rule: rule, Message: fmt.Sprintf(format, args...)})
}

func (e *evaluation) decision() Decision {
	if len(e.reasons) > 0 {
		return Decision{Reasons: e.reasons}
	}
	return Decision{Allow: true}
}

// Evaluate decides whether a guest may move from the host that produced source to the one
// that produced destination, placed as host says. source and destination must be claims that
// attest.Verifier.Verify returned. Evaluate is pure and denies by default: it allows only when
// every rule passes, and otherwise returns every failed rule with its values.
func Evaluate(p *Policy, source, destination *attest.Claims, host HostInfo) Decision {
	return evaluate(p, source, destination, host, (*attest.Claims).Check)
}

// EvaluateAdoption decides whether a guest's first residency may be on the host that produced
// claims, placed as host says: there is no source, so only the destination rules apply (and a
// CEL expression sees an empty source).
func EvaluateAdoption(p *Policy, claims *attest.Claims, host HostInfo) Decision {
	return evaluate(p, nil, claims, host, (*attest.Claims).Check)
}

func evaluate(p *Policy, source, destination *attest.Claims, host HostInfo, check func(*attest.Claims, attest.Requirements) error) Decision {
	e := &evaluation{check: check}
	if p == nil {
		e.deny("policy", "no policy")
		return e.decision()
	}
	adoption := source == nil
	if !adoption {
		e.end("source", p.Spec.Source, source)
	}
	e.end("destination", p.Spec.Destination.EndRequirements, destination)
	if !adoption && destination != nil && p.Spec.DestinationTCBAtLeastSource {
		e.tcbAtLeast(source, destination)
	}
	e.host(p.Spec.Destination, host)
	if destination != nil {
		e.clean(p.Spec.Destination.Clean, destination)
	}
	if p.cel != nil {
		e.cel(p.cel, source, destination, host)
	}
	return e.decision()
}

// end checks one end's claims: platform and baseline requirements.
func (e *evaluation) end(end string, r EndRequirements, c *attest.Claims) {
	if c == nil {
		e.deny(end+".claims", "%s has no claims", end)
		return
	}
	if !slices.Contains(r.Platforms, c.Platform) {
		e.deny(end+".platform", "%s platform %v is not accepted (accepted: %s)", end, c.Platform, platformList(r.Platforms))
		return
	}
	switch {
	case c.Platform.IsSNP() && (c.SNP == nil || c.TDX != nil), c.Platform.IsTDX() && (c.TDX == nil || c.SNP != nil):
		e.deny(end+".claims", "%s claims do not match platform %v", end, c.Platform)
		return
	}
	err := e.check(c, r.Requirements())
	if err == nil {
		return
	}
	vs := attest.Violations(err)
	for _, v := range vs {
		e.deny(end+"."+v.Rule, "%s %s %s, want %s", end, v.Rule, v.Got, v.Want)
	}
	if len(vs) == 0 {
		// Not a violation: the check itself could not run. Deny, never allow what was not checked.
		e.deny(end+".requirements", "%s requirements could not be checked: %v", end, err)
	}
}

// tcbAtLeast checks every TCB component of the destination is at least the source's.
func (e *evaluation) tcbAtLeast(src, dst *attest.Claims) {
	const rule = "destinationTcbAtLeastSource"
	switch {
	case src.Platform.IsSNP() && dst.Platform.IsSNP():
		if src.SNP == nil || dst.SNP == nil {
			return // reported by end
		}
		s, d := src.SNP.ReportedTCB, dst.SNP.ReportedTCB
		for _, c := range []struct {
			name     string
			src, dst uint8
		}{
			{"fmc", s.FMC, d.FMC}, // Turin's firmware; zero on Milan and Genoa
			{"bootloader", s.BootLoader, d.BootLoader},
			{"tee", s.TEE, d.TEE},
			{"snp", s.SNP, d.SNP},
			{"microcode", s.Microcode, d.Microcode},
		} {
			if c.dst < c.src {
				e.deny(rule, "destination snp.tcb.%s 0x%02x < source 0x%02x", c.name, c.dst, c.src)
			}
		}
	case src.Platform.IsTDX() && dst.Platform.IsTDX():
		if src.TDX == nil || dst.TDX == nil {
			return // reported by end
		}
		s, d := src.TDX.TEETCBSVN, dst.TDX.TEETCBSVN
		if len(s) != len(d) {
			e.deny(rule, "destination tdx.teeTcbSvn has %d bytes, source %d", len(d), len(s))
			return
		}
		for i := range s {
			if d[i] < s[i] {
				e.deny(rule, "destination tdx.teeTcbSvn[%d] 0x%02x < source 0x%02x", i, d[i], s[i])
			}
		}
	default:
		e.deny(rule, "destination platform %v cannot be compared with source platform %v: a guest cannot move between architectures", dst.Platform, src.Platform)
	}
}

// host checks the destination host's labels and region.
func (e *evaluation) host(r DestinationRequirements, h HostInfo) {
	for _, k := range slices.Sorted(maps.Keys(r.HostLabels)) {
		want := r.HostLabels[k]
		got, ok := h.Labels[k]
		switch {
		case !ok:
			e.deny("destination.hostLabels", "destination host has no label %s, want %s=%s", k, k, want)
		case got != want:
			e.deny("destination.hostLabels", "destination host label %s=%s, want %s=%s", k, got, k, want)
		}
	}
	if len(r.Regions) > 0 && !slices.Contains(r.Regions, h.Region) {
		region := h.Region
		if region == "" {
			region = "(none)"
		}
		e.deny("destination.regions", "destination region %s is not accepted (accepted: %s)", region, strings.Join(r.Regions, ", "))
	}
}

// clean checks the destination's clean-memory statement.
func (e *evaluation) clean(r CleanRequirements, c *attest.Claims) {
	const rule = "destination.clean"
	if !r.RequireStatement && len(r.LaunchMeasurement) == 0 && r.MinimumBytes == 0 {
		return
	}
	if len(c.Statement) == 0 {
		e.deny(rule, "destination made no clean-memory statement")
		return
	}
	s, err := attest.ParseCleanMemoryStatement(c.Statement)
	if err != nil {
		e.deny(rule, "destination statement is not a clean-memory statement: %v", err)
		return
	}
	if r.RequireStatement {
		if !s.Zeroed {
			e.deny(rule, "destination receive region not zeroed")
		}
		if !s.VerifiedZero {
			e.deny(rule, "destination receive region not verified zero")
		}
	}
	if s.Bytes < r.MinimumBytes {
		e.deny(rule, "destination receive region %d bytes < minimum %d", s.Bytes, r.MinimumBytes)
	}
	if len(r.LaunchMeasurement) > 0 && !slices.Equal(s.LaunchMeasurement, r.LaunchMeasurement) {
		got := s.LaunchMeasurement.String()
		if got == "" {
			got = "(none)"
		}
		e.deny(rule, "destination launch measurement %s, want %s", got, r.LaunchMeasurement)
	}
}

// cel runs the policy's CEL expression; anything but true is a denial.
func (e *evaluation) cel(prg *celProgram, source, destination *attest.Claims, host HostInfo) {
	src, err := claimsVar(source)
	if err != nil {
		e.deny("cel", "cel: %v", err)
		return
	}
	dst, err := claimsVar(destination)
	if err != nil {
		e.deny("cel", "cel: %v", err)
		return
	}
	ok, err := prg.eval(map[string]any{"source": src, "destination": dst, "host": hostVar(host)})
	switch {
	case err != nil:
		e.deny("cel", "cel expression failed: %v", err)
	case !ok:
		e.deny("cel", "cel expression is false")
	}
}

// EvaluateErasure decides whether the source's erasure evidence satisfies p: claims are the
// verified claims of the source's final evidence (role erased), whose statement must be an
// erasure statement for migrationID saying the transfer key and memory data key were
// zeroized; committed and now are the commit time and the time of the receipt, at most
// p.Spec.Erasure.Deadline apart. Like Evaluate it is pure and denies by default.
func EvaluateErasure(p *Policy, claims *attest.Claims, migrationID string, committed, now time.Time) Decision {
	const rule = "erasure"
	e := &evaluation{}
	switch {
	case p == nil:
		e.deny("policy", "no policy")
		return e.decision()
	case claims == nil:
		e.deny(rule, "source made no erasure evidence")
		return e.decision()
	}
	s, err := attest.ParseErasureStatement(claims.Statement)
	if err != nil {
		e.deny(rule, "source statement is not an erasure statement: %v", err)
		return e.decision()
	}
	if s.MigrationID != migrationID {
		e.deny(rule, "erasure statement is for migration %q, want %q", s.MigrationID, migrationID)
	}
	for _, k := range []string{attest.KeyTransfer, attest.KeyMemoryData} {
		if !slices.Contains(s.KeysZeroized, k) {
			e.deny(rule, "source did not zeroize key %s (zeroized: %s)", k, strings.Join(s.KeysZeroized, ", "))
		}
	}
	if took := now.Sub(committed); took > p.Spec.Erasure.Deadline {
		e.deny("erasure.deadline", "erasure took %v after commit, deadline %v", took, p.Spec.Erasure.Deadline)
	}
	return e.decision()
}

func platformList(ps []attest.Platform) string {
	names := make([]string, len(ps))
	for i, p := range ps {
		names[i] = p.String()
	}
	return strings.Join(names, ", ")
}
