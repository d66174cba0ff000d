package policy

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

// verified returns the verified claims of evidence from the emulated platform saved in dir (made
// on first use: making keys is the slow part).
func verified(t *testing.T, dir string, pl attest.Platform, opts emulate.Options, stmt []byte) *attest.Claims {
	t.Helper()
	e, err := emulate.Open(dir, pl, opts)
	if err != nil {
		t.Fatalf("emulating %v: %v", pl, err)
	}
	ev, err := attest.Produce(t.Context(), e, attest.Binding{MigrationID: "m", Role: attest.RoleDestination, Statement: stmt})
	if err != nil {
		t.Fatal(err)
	}
	v, err := attest.NewVerifier(attest.Config{Roots: []attest.Roots{e.Roots()}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := v.Verify(t.Context(), ev, attest.Expectation{SkipReportData: true})
	if err != nil {
		t.Fatalf("verifying %v evidence: %v", pl, err)
	}
	return c
}

// TestEvaluateBaselineThroughAttest runs the baseline rules that attest's check evaluates, on
// verified emulated evidence: each policy field reaches the check and a failure names its rule.
func TestEvaluateBaselineThroughAttest(t *testing.T) {
	clean := goodClean(t)
	dir := t.TempDir()
	snp, tdx := attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX
	low := attest.SNPTCB{BootLoader: 2, TEE: 0, SNP: 8, Microcode: 0x20}
	vmpl1 := uint32(1)
	tests := []struct {
		name  string
		pl    attest.Platform
		opts  emulate.Options
		reqs  func(*EndRequirements)
		rules []string // failing rules, in order; none: allow
	}{
		{name: "snp allow", pl: snp, opts: emulate.Options{TCB: &low}},
		{name: "snp debug", pl: snp, opts: emulate.Options{Debug: true}, rules: []string{"destination.snp.policy.debug"}},
		{name: "snp debug allowed", pl: snp, opts: emulate.Options{Debug: true}, reqs: func(r *EndRequirements) { r.SNP.AllowDebug = true }},
		{name: "snp minimum tcb", pl: snp, opts: emulate.Options{TCB: &low}, reqs: func(r *EndRequirements) { r.SNP.MinimumTCB.Microcode = 0x30 },
			rules: []string{"destination.snp.tcb.microcode"}},
		{name: "snp measurement", pl: snp, opts: emulate.Options{Measurement: repeat(1, 48)}, reqs: func(r *EndRequirements) { r.SNP.Measurements = []attest.HexBytes{repeat(2, 48)} },
			rules: []string{"destination.snp.measurement"}},
		{name: "snp measurement accepted", pl: snp, opts: emulate.Options{Measurement: repeat(1, 48)}, reqs: func(r *EndRequirements) {
			r.SNP.Measurements = []attest.HexBytes{repeat(2, 48), repeat(1, 48)}
		}},
		{name: "snp vmpl", pl: snp, reqs: func(r *EndRequirements) { r.SNP.VMPL = &vmpl1 }, rules: []string{"destination.snp.vmpl"}},
		{name: "snp product", pl: snp, reqs: func(r *EndRequirements) { r.SNP.Products = []string{"Turin"} }, rules: []string{"destination.snp.product"}},
		{name: "snp host data", pl: snp, reqs: func(r *EndRequirements) { r.SNP.HostData = repeat(9, 32) }, rules: []string{"destination.snp.hostData"}},
		{name: "tdx allow", pl: tdx},
		{name: "tdx debug", pl: tdx, opts: emulate.Options{Debug: true}, rules: []string{"destination.tdx.attributes.debug"}},
		{name: "tdx mrtd", pl: tdx, opts: emulate.Options{MRTD: repeat(1, 48)}, reqs: func(r *EndRequirements) { r.TDX.MRTDs = []attest.HexBytes{repeat(2, 48)} },
			rules: []string{"destination.tdx.mrtd"}},
		{name: "tdx fmspc", pl: tdx, reqs: func(r *EndRequirements) { r.TDX.FMSPCs = []attest.HexBytes{repeat(7, 6)} }, rules: []string{"destination.tdx.fmspc"}},
		{name: "tdx tee tcb svn", pl: tdx, reqs: func(r *EndRequirements) { r.TDX.MinimumTEETCBSVN = repeat(0xff, 16) }, rules: []string{"destination.tdx.teeTcbSvn"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := verified(t, dir, tc.pl, tc.opts, clean)
			p := basePolicy(t)
			if tc.reqs != nil {
				tc.reqs(&p.Spec.Destination.EndRequirements)
			}
			d := EvaluateAdoption(p, c, HostInfo{})
			var rules []string
			for _, r := range d.Reasons {
				rules = append(rules, r.Rule)
			}
			if diff := cmp.Diff(tc.rules, rules); diff != "" {
				t.Errorf("failing rules (-want +got):\n%s\ndecision: %v", diff, d)
			}
			if d.Allow != (len(tc.rules) == 0) {
				t.Errorf("Allow = %v, reasons %v", d.Allow, d.Reasons)
			}
		})
	}
	// Both ends through Evaluate: the destination's TCB is below the source's.
	high := attest.SNPTCB{BootLoader: 2, TEE: 0, SNP: 8, Microcode: 0x22}
	src := verified(t, dir, snp, emulate.Options{TCB: &high}, nil)
	dst := verified(t, dir, snp, emulate.Options{TCB: &low}, clean)
	d := Evaluate(basePolicy(t), src, dst, HostInfo{})
	want := Decision{Reasons: []Reason{{Rule: "destinationTcbAtLeastSource", Message: "destination snp.tcb.microcode 0x20 < source 0x22"}}}
	if diff := cmp.Diff(want, d); diff != "" {
		t.Errorf("decision (-want +got):\n%s", diff)
	}
}
