package broker

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// Prefilter is the part of a tenant's policy the broker can check before any evidence exists:
// where the guest may go. It is advice for choosing a destination and for dry runs; the
// keybroker's evaluation of the signed policy on evidence decides.
type Prefilter struct {
	// Platforms the destination may be; empty allows any.
	Platforms []attest.Platform
	// Labels the destination host must carry with these values.
	Labels map[string]string
	// Regions the destination must be in; empty allows any.
	Regions []string
	// MinimumTCB is the lowest TCB the policy accepts of a destination, if it states one
	// (SEV-SNP minimumTcb, TDX minimumTeeTcbSvn); the broker compares the TCBs hosts report
	// against it only to list the guests a new minimum would move (an evacuation's dry run).
	MinimumTCB *attest.HostTCB
}

// PolicyReader extracts the pre-filter from a signed policy envelope. It must not need the
// signature to be checked (the broker cannot, and its result is only advice).
type PolicyReader func(envelope []byte) (*Prefilter, error)

// noPrefilterNote is said in every dry run when no PolicyReader is configured.
const noPrefilterNote = "policy pre-filter not configured: only liveness and platform checked"

// UncheckedNote is said in every dry run: what a pass does not promise. The rest of the
// policy needs both ends' verified evidence, which only the keybroker sees, at release.
const UncheckedNote = "a pass is the pre-filter's; not checked before evidence exists: " +
	"TCB levels (minimum TCB, destinationTcbAtLeastSource), measurements, guest policy bits, the CEL rule: " +
	"the keybroker evaluates them on fresh evidence at release and may still refuse a host that passes here"

// verdicts judges every host in hosts as a destination for guest g (on platform p, at host
// source) under the policy envelope.
func (b *Broker) verdicts(hosts []*agentapi.HostRecord, source string, p attest.Platform, envelope []byte, now time.Time) ([]HostVerdict, []string) {
	notes := []string{UncheckedNote}
	var pf *Prefilter
	var pfErr error
	if b.cfg.ReadPolicy == nil {
		notes = append(notes, noPrefilterNote)
	} else {
		pf, pfErr = b.cfg.ReadPolicy(envelope)
		if pfErr != nil {
			notes = append(notes, "policy cannot be read: "+pfErr.Error())
		}
	}
	out := make([]HostVerdict, 0, len(hosts))
	for _, h := range hosts {
		var reasons []string
		if h.Host == source {
			reasons = append(reasons, "is the guest's current host")
		}
		if live, why := b.fresh(h, now); !live {
			reasons = append(reasons, "not live: "+why)
		}
		// The tenant's policy decides which platforms a guest may move to (a move from SEV-SNP
		// to TDX is the policy's to allow); without one the broker keeps a guest on its own.
		if pf == nil && h.Platform != p {
			reasons = append(reasons, fmt.Sprintf("platform %v is not the guest's platform %v", h.Platform, p))
		}
		if pfErr != nil {
			reasons = append(reasons, "policy cannot be read")
		}
		if pf != nil {
			reasons = append(reasons, pf.check(h)...)
		}
		out = append(out, HostVerdict{Host: h.Host, Pass: len(reasons) == 0, Reasons: reasons})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out, notes
}

// check returns why h does not pass the pre-filter.
func (pf *Prefilter) check(h *agentapi.HostRecord) []string {
	var reasons []string
	if len(pf.Platforms) > 0 && !slices.Contains(pf.Platforms, h.Platform) {
		names := make([]string, len(pf.Platforms))
		for i, p := range pf.Platforms {
			names[i] = p.String()
		}
		reasons = append(reasons, fmt.Sprintf("platform %v not allowed by policy (allowed: %s)", h.Platform, strings.Join(names, ", ")))
	}
	keys := make([]string, 0, len(pf.Labels))
	for k := range pf.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		want := pf.Labels[k]
		got, ok := h.Labels[k]
		switch {
		case !ok:
			reasons = append(reasons, fmt.Sprintf("label %s missing, policy requires %q", k, want))
		case got != want:
			reasons = append(reasons, fmt.Sprintf("label %s=%q, policy requires %q", k, got, want))
		}
	}
	if len(pf.Regions) > 0 && !slices.Contains(pf.Regions, h.Region) {
		reasons = append(reasons, fmt.Sprintf("region %q not allowed by policy (allowed: %s)", h.Region, strings.Join(pf.Regions, ", ")))
	}
	return reasons
}
