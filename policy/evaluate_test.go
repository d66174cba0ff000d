package policy

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// noCheck stands in for attest's baseline check, which needs claims from a verified report:
// these tests are about the rules this package owns.
func noCheck(*attest.Claims, attest.Requirements) error { return nil }

func repeat(b byte, n int) attest.HexBytes { return bytes.Repeat([]byte{b}, n) }

func cleanStatement(t testing.TB, s attest.CleanMemoryStatement) []byte {
	t.Helper()
	b, err := s.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func goodClean(t testing.TB) []byte {
	return cleanStatement(t, attest.CleanMemoryStatement{Zeroed: true, VerifiedZero: true, Bytes: 1 << 30, LaunchMeasurement: repeat(0xaa, 48)})
}

func snpClaims(pl attest.Platform, tcb attest.SNPTCB, stmt []byte) *attest.Claims {
	return &attest.Claims{
		Platform:  pl,
		Statement: stmt,
		SNP: &attest.SNPClaims{
			Product: "Genoa", Measurement: repeat(0x11, 48), ChipID: repeat(0x22, 64),
			ReportedTCB: tcb, CurrentTCB: tcb, CommittedTCB: tcb, LaunchTCB: tcb, TCBStatus: "UpToDate",
		},
	}
}

func tdxClaims(pl attest.Platform, svn attest.HexBytes, stmt []byte) *attest.Claims {
	return &attest.Claims{
		Platform:  pl,
		Statement: stmt,
		TDX:       &attest.TDXClaims{TEETCBSVN: svn, MRTD: repeat(0x33, 48), FMSPC: repeat(0x44, 6), TCBStatus: "UpToDate"},
	}
}

// basePolicy accepts every platform at both ends, with the defaults otherwise.
func basePolicy(t testing.TB, mutate ...func(*Policy)) *Policy {
	t.Helper()
	p := &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Tenant: "acme", Name: "db", PolicySVN: 1}, Spec: Defaults()}
	p.Spec.Source.Platforms = attest.Platforms
	p.Spec.Destination.Platforms = attest.Platforms
	for _, m := range mutate {
		m(p)
	}
	return p
}

func withCEL(t testing.TB, expr string) func(*Policy) {
	return func(p *Policy) {
		prg, err := compileCEL(expr)
		if err != nil {
			t.Fatalf("compiling %q: %v", expr, err)
		}
		p.Spec.CEL, p.cel = expr, prg
	}
}

var tcb = attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 0x14, Microcode: 0x14}

type evalCase struct {
	name     string
	policy   func(*Policy)
	source   *attest.Claims
	dest     *attest.Claims
	host     HostInfo
	adoption bool
	check    func(*attest.Claims, attest.Requirements) error
	want     Decision
}

func evalCases(t testing.TB) []evalCase {
	snp := attest.PlatformSEVSNP
	tdx := attest.PlatformTDX
	svn := attest.HexBytes{3, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	lower := attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 0x14, Microcode: 0x12}
	deny := func(rule, msg string) Decision { return Decision{Reasons: []Reason{{Rule: rule, Message: msg}}} }
	allow := Decision{Allow: true}
	clean := goodClean(t)
	return []evalCase{
		{name: "allow snp", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), want: allow},
		{name: "allow tdx", source: tdxClaims(tdx, svn, nil), dest: tdxClaims(tdx, svn, clean), want: allow},
		{name: "allow emulated when listed", source: snpClaims(attest.PlatformEmulatedSEVSNP, tcb, nil), dest: snpClaims(attest.PlatformEmulatedSEVSNP, tcb, clean), want: allow},
		{name: "allow destination tcb higher", source: snpClaims(snp, lower, nil), dest: snpClaims(snp, tcb, clean), want: allow},
		{
			name: "deny emulated by default", policy: func(p *Policy) { p.Spec = Defaults() },
			source: snpClaims(attest.PlatformEmulatedSEVSNP, tcb, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("source.platform", "source platform emulated-sev-snp is not accepted (accepted: sev-snp, tdx)"),
		},
		{
			name: "deny destination platform", policy: func(p *Policy) { p.Spec.Destination.Platforms = []attest.Platform{snp} },
			source: tdxClaims(tdx, svn, nil), dest: tdxClaims(tdx, svn, clean),
			want: deny("destination.platform", "destination platform tdx is not accepted (accepted: sev-snp)"),
		},
		{
			name: "deny no destination claims", source: snpClaims(snp, tcb, nil),
			want: deny("destination.claims", "destination has no claims"),
		},
		{
			name: "deny claims not matching platform", source: &attest.Claims{Platform: snp}, dest: snpClaims(snp, tcb, clean),
			want: deny("source.claims", "source claims do not match platform sev-snp"),
		},
		{
			name: "deny destination tcb lower", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, lower, clean),
			want: deny("destinationTcbAtLeastSource", "destination snp.tcb.microcode 0x12 < source 0x14"),
		},
		{
			name: "deny every lower tcb component", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, attest.SNPTCB{BootLoader: 2, SNP: 0x13, Microcode: 0x14}, clean),
			want: Decision{Reasons: []Reason{
				{Rule: "destinationTcbAtLeastSource", Message: "destination snp.tcb.bootloader 0x02 < source 0x03"},
				{Rule: "destinationTcbAtLeastSource", Message: "destination snp.tcb.snp 0x13 < source 0x14"},
			}},
		},
		{
			name: "deny a lower Turin fmc", source: snpClaims(snp, attest.SNPTCB{FMC: 1, BootLoader: 3, SNP: 0x14, Microcode: 0x14}, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("destinationTcbAtLeastSource", "destination snp.tcb.fmc 0x00 < source 0x01"),
		},
		{
			name: "allow lower tcb when the rule is off", policy: func(p *Policy) { p.Spec.DestinationTCBAtLeastSource = false },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, lower, clean), want: allow,
		},
		{
			name: "deny tdx tee tcb svn lower", source: tdxClaims(tdx, svn, nil),
			dest: tdxClaims(tdx, attest.HexBytes{3, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, clean),
			want: deny("destinationTcbAtLeastSource", "destination tdx.teeTcbSvn[2] 0x04 < source 0x05"),
		},
		{
			name: "deny across architectures", source: snpClaims(snp, tcb, nil), dest: tdxClaims(tdx, svn, clean),
			want: deny("destinationTcbAtLeastSource", "destination platform tdx cannot be compared with source platform sev-snp: a guest cannot move between architectures"),
		},
		{
			name: "allow host labels", policy: func(p *Policy) { p.Spec.Destination.HostLabels = map[string]string{"zone": "a"} },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), host: HostInfo{Labels: map[string]string{"zone": "a", "x": "y"}}, want: allow,
		},
		{
			name: "deny host label missing and wrong", policy: func(p *Policy) { p.Spec.Destination.HostLabels = map[string]string{"zone": "a", "pool": "db"} },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), host: HostInfo{Labels: map[string]string{"zone": "b"}},
			want: Decision{Reasons: []Reason{
				{Rule: "destination.hostLabels", Message: "destination host has no label pool, want pool=db"},
				{Rule: "destination.hostLabels", Message: "destination host label zone=b, want zone=a"},
			}},
		},
		{
			name: "allow region", policy: func(p *Policy) { p.Spec.Destination.Regions = []string{"eu-west-1"} },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), host: HostInfo{Region: "eu-west-1"}, want: allow,
		},
		{
			name: "deny region", policy: func(p *Policy) { p.Spec.Destination.Regions = []string{"eu-west-1", "eu-central-1"} },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), host: HostInfo{Region: "us-east-1"},
			want: deny("destination.regions", "destination region us-east-1 is not accepted (accepted: eu-west-1, eu-central-1)"),
		},
		{
			name: "deny no clean statement", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, nil),
			want: deny("destination.clean", "destination made no clean-memory statement"),
		},
		{
			name: "allow no clean statement when not required", policy: func(p *Policy) { p.Spec.Destination.Clean.RequireStatement = false },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, nil), want: allow,
		},
		{
			name: "deny statement not canonical", source: snpClaims(snp, tcb, nil),
			dest: snpClaims(snp, tcb, []byte(`{"zeroed":true, "type":"lethe.dev/clean-memory/v1","verifiedZero":true,"bytes":1}`)),
			want: deny("destination.clean", "destination statement is not a clean-memory statement: decoding clean-memory statement: statement is not canonical JSON"),
		},
		{
			name: "deny erasure statement as clean statement", source: snpClaims(snp, tcb, nil),
			dest: snpClaims(snp, tcb, must(attest.ErasureStatement{MigrationID: "m"}.Encode())),
			want: deny("destination.clean", `destination statement is not a clean-memory statement: decoding clean-memory statement: json: unknown field "keysZeroized"`),
		},
		{
			name: "deny region not zeroed", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, cleanStatement(t, attest.CleanMemoryStatement{Bytes: 1})),
			want: Decision{Reasons: []Reason{
				{Rule: "destination.clean", Message: "destination receive region not zeroed"},
				{Rule: "destination.clean", Message: "destination receive region not verified zero"},
			}},
		},
		{
			name: "deny region too small", policy: func(p *Policy) { p.Spec.Destination.Clean.MinimumBytes = 2 << 30 },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("destination.clean", "destination receive region 1073741824 bytes < minimum 2147483648"),
		},
		{
			name: "allow launch measurement", policy: func(p *Policy) { p.Spec.Destination.Clean.LaunchMeasurement = repeat(0xaa, 48) },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), want: allow,
		},
		{
			name: "deny launch measurement", policy: func(p *Policy) { p.Spec.Destination.Clean.LaunchMeasurement = repeat(0xbb, 48) },
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("destination.clean", "destination launch measurement "+repeat(0xaa, 48).String()+", want "+repeat(0xbb, 48).String()),
		},
		{
			name: "deny baseline violation", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			check: func(c *attest.Claims, r attest.Requirements) error {
				if c.Statement == nil {
					return nil
				}
				return errors.Join(&attest.Violation{Rule: "snp.tcb.microcode", Got: "0x14", Want: ">= 0x20"}, &attest.Violation{Rule: "snp.debug", Got: "true", Want: "false"})
			},
			want: Decision{Reasons: []Reason{
				{Rule: "destination.snp.tcb.microcode", Message: "destination snp.tcb.microcode 0x14, want >= 0x20"},
				{Rule: "destination.snp.debug", Message: "destination snp.debug true, want false"},
			}},
		},
		{
			name: "deny when the baseline cannot be checked", source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			check: func(*attest.Claims, attest.Requirements) error { return errors.New("no report") },
			want: Decision{Reasons: []Reason{
				{Rule: "source.requirements", Message: "source requirements could not be checked: no report"},
				{Rule: "destination.requirements", Message: "destination requirements could not be checked: no report"},
			}},
		},
		{
			name: "allow cel", policy: withCEL(t, `destination.snp.product == source.snp.product && destination.snp.reportedTcb.ucode >= 20 && host.region == "r"`),
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), host: HostInfo{Region: "r"}, want: allow,
		},
		{
			name: "allow cel on statement", policy: withCEL(t, `destination.statement.bytes >= 1024`),
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean), want: allow,
		},
		{
			name: "deny cel false", policy: withCEL(t, `destination.snp.product == "Milan"`),
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("cel", "cel expression is false"),
		},
		{
			name: "deny cel runtime error", policy: withCEL(t, `destination.tdx.debug == false`),
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("cel", "cel expression failed: no such key: tdx"),
		},
		{
			name: "deny cel not bool", policy: withCEL(t, `destination.snp.product`),
			source: snpClaims(snp, tcb, nil), dest: snpClaims(snp, tcb, clean),
			want: deny("cel", "cel expression failed: result is Genoa of type string, not a bool"),
		},
		{
			name: "allow adoption without source", adoption: true, policy: func(p *Policy) { p.Spec.Source.Platforms = nil },
			dest: snpClaims(snp, tcb, clean), want: allow,
		},
		{
			name: "deny adoption on destination rules", adoption: true, policy: func(p *Policy) { p.Spec.Destination.Regions = []string{"eu"} },
			dest: snpClaims(attest.PlatformEmulatedTDX, tcb, nil), host: HostInfo{Region: "us"},
			want: Decision{Reasons: []Reason{
				{Rule: "destination.claims", Message: "destination claims do not match platform emulated-tdx"},
				{Rule: "destination.regions", Message: "destination region us is not accepted (accepted: eu)"},
				{Rule: "destination.clean", Message: "destination made no clean-memory statement"},
			}},
		},
		{
			name: "allow adoption cel guarding source", adoption: true, policy: withCEL(t, `!has(source.platform) || source.platform == destination.platform`),
			dest: snpClaims(snp, tcb, clean), want: allow,
		},
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestEvaluate(t *testing.T) {
	for _, tc := range evalCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			p := basePolicy(t)
			if tc.policy != nil {
				tc.policy(p)
			}
			check := tc.check
			if check == nil {
				check = noCheck
			}
			src := tc.source
			if tc.adoption {
				src = nil
			}
			got := evaluate(p, src, tc.dest, tc.host, check)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("decision (-want +got):\n%s", diff)
			}
			if got.Allow != (got.Err() == nil) || (!got.Allow && !errors.Is(got.Err(), ErrDenied)) {
				t.Errorf("Err() = %v for %+v", got.Err(), got)
			}
		})
	}
}

func TestEvaluateNil(t *testing.T) {
	clean := goodClean(t)
	tests := []struct {
		name string
		got  Decision
		want Decision
	}{
		{"no policy", Evaluate(nil, snpClaims(attest.PlatformSEVSNP, tcb, nil), snpClaims(attest.PlatformSEVSNP, tcb, clean), HostInfo{}),
			Decision{Reasons: []Reason{{Rule: "policy", Message: "no policy"}}}},
		{"no source", Evaluate(basePolicy(t), nil, nil, HostInfo{}),
			Decision{Reasons: []Reason{{Rule: "destination.claims", Message: "destination has no claims"}}}},
		{"adoption no policy", EvaluateAdoption(nil, nil, HostInfo{}),
			Decision{Reasons: []Reason{{Rule: "policy", Message: "no policy"}}}},
		{"zero decision denies", Decision{}, Decision{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, tc.got); diff != "" {
				t.Errorf("decision (-want +got):\n%s", diff)
			}
			if tc.got.Allow {
				t.Error("allowed")
			}
		})
	}
}

// TestEvaluateUsesAttestCheck makes sure Evaluate hands each end's claims to attest's check:
// until that check passes on these hand-made claims (they carry no report), it must deny.
func TestEvaluateUsesAttestCheck(t *testing.T) {
	p := basePolicy(t)
	src := snpClaims(attest.PlatformSEVSNP, tcb, nil)
	dst := snpClaims(attest.PlatformSEVSNP, tcb, goodClean(t))
	got := Evaluate(p, src, dst, HostInfo{})
	want := evaluate(p, src, dst, HostInfo{}, (*attest.Claims).Check)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Evaluate differs from evaluate with attest's check (-want +got):\n%s", diff)
	}
}

func TestRequirementsTranslation(t *testing.T) {
	vmpl := uint32(0)
	e := EndRequirements{
		SNP: SNPRequirements{
			MinimumTCB: tcb, MinimumLaunchTCB: attest.SNPTCB{SNP: 1}, AllowSMT: true, AllowMigrateMA: true,
			Measurements: []attest.HexBytes{repeat(1, 48)}, Products: []string{"Genoa"}, VMPL: &vmpl,
			ChipIDs: []attest.HexBytes{repeat(2, 64)}, HostData: repeat(3, 32),
		},
		TDX: TDXRequirements{
			MinimumTEETCBSVN: repeat(4, 16), MRSEAMs: []attest.HexBytes{repeat(5, 48)}, MRTDs: []attest.HexBytes{repeat(6, 48)},
			RTMR2: []attest.HexBytes{repeat(7, 48)}, AllowDebug: true, TDAttributes: repeat(8, 8), XFAM: repeat(9, 8),
			MinimumQESVN: 8, MinimumPCESVN: 13, FMSPCs: []attest.HexBytes{repeat(10, 6)},
		},
	}
	want := attest.Requirements{
		SNP: attest.SNPRequirements{
			MinimumTCB: tcb, MinimumLaunchTCB: attest.SNPTCB{SNP: 1}, AllowSMT: true, AllowMigrateMA: true,
			Measurements: [][]byte{repeat(1, 48)}, Products: []string{"Genoa"}, VMPL: &vmpl,
			ChipIDs: [][]byte{repeat(2, 64)}, HostData: repeat(3, 32),
		},
		TDX: attest.TDXRequirements{
			MinimumTEETCBSVN: repeat(4, 16), MRSEAMs: [][]byte{repeat(5, 48)}, MRTDs: [][]byte{repeat(6, 48)},
			RTMRs: [4][][]byte{nil, nil, {repeat(7, 48)}, nil}, AllowDebug: true, TDAttributes: repeat(8, 8), XFAM: repeat(9, 8),
			MinimumQESVN: 8, MinimumPCESVN: 13, FMSPCs: [][]byte{repeat(10, 6)},
		},
	}
	if diff := cmp.Diff(want, e.Requirements()); diff != "" {
		t.Errorf("Requirements() (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(attest.Requirements{SNP: attest.SNPRequirements{AllowSMT: true}}, Defaults().Source.Requirements()); diff != "" {
		t.Errorf("default requirements (-want +got):\n%s", diff)
	}
}

func TestEvaluateErasure(t *testing.T) {
	committed := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	stmt := func(s attest.ErasureStatement) *attest.Claims {
		return &attest.Claims{Platform: attest.PlatformSEVSNP, Statement: must(s.Encode())}
	}
	good := attest.ErasureStatement{MigrationID: "m1", KeysZeroized: []string{"tk", "mdk", "hpke"}, PagesScrubbed: 10}
	tests := []struct {
		name   string
		claims *attest.Claims
		now    time.Time
		want   Decision
	}{
		{"allow", stmt(good), committed.Add(time.Minute), Decision{Allow: true}},
		{"deny late", stmt(good), committed.Add(11 * time.Minute),
			Decision{Reasons: []Reason{{Rule: "erasure.deadline", Message: "erasure took 11m0s after commit, deadline 10m0s"}}}},
		{"deny keys kept", stmt(attest.ErasureStatement{MigrationID: "m1", KeysZeroized: []string{"tk"}}), committed,
			Decision{Reasons: []Reason{{Rule: "erasure", Message: "source did not zeroize key mdk (zeroized: tk)"}}}},
		{"deny other migration", stmt(attest.ErasureStatement{MigrationID: "m2", KeysZeroized: []string{"tk", "mdk"}}), committed,
			Decision{Reasons: []Reason{{Rule: "erasure", Message: `erasure statement is for migration "m2", want "m1"`}}}},
		{"deny clean statement", &attest.Claims{Statement: goodClean(t)}, committed,
			Decision{Reasons: []Reason{{Rule: "erasure", Message: `source statement is not an erasure statement: decoding erasure statement: json: unknown field "bytes"`}}}},
		{"deny no evidence", nil, committed, Decision{Reasons: []Reason{{Rule: "erasure", Message: "source made no erasure evidence"}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := EvaluateErasure(basePolicy(t), tc.claims, "m1", committed, tc.now)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("decision (-want +got):\n%s", diff)
			}
		})
	}
}

func TestCanonicalStatement(t *testing.T) {
	got := string(goodClean(t))
	want := `{"bytes":1073741824,"launchMeasurement":"` + repeat(0xaa, 48).String() + `","type":"lethe.dev/clean-memory/v1","verifiedZero":true,"zeroed":true}`
	if got != want {
		t.Errorf("Encode() = %s, want %s", got, want)
	}
	s, err := attest.ParseCleanMemoryStatement([]byte(got))
	if err != nil {
		t.Fatal(err)
	}
	if !s.Zeroed || !s.VerifiedZero || s.Bytes != 1<<30 {
		t.Errorf("parsed %+v", s)
	}
	if _, err := attest.ParseCleanMemoryStatement([]byte(got + " ")); err == nil {
		t.Error("trailing space accepted")
	}
}

// TestExplanationsGolden keeps the wording of denials stable: they are what a tenant reads.
func TestExplanationsGolden(t *testing.T) {
	var b strings.Builder
	for _, tc := range evalCases(t) {
		if tc.want.Allow {
			continue
		}
		p := basePolicy(t)
		if tc.policy != nil {
			tc.policy(p)
		}
		check := tc.check
		if check == nil {
			check = noCheck
		}
		src := tc.source
		if tc.adoption {
			src = nil
		}
		d := evaluate(p, src, tc.dest, tc.host, check)
		fmt.Fprintf(&b, "# %s\ndeny\n", tc.name)
		for _, r := range d.Reasons {
			fmt.Fprintf(&b, "  - %s: %s\n", r.Rule, r.Message)
		}
	}
	golden(t, "explanations.golden", b.String())
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file (run with -update to create it): %v", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s differs (-want +got):\n%s", path, diff)
	}
}

func BenchmarkEvaluate(b *testing.B) {
	clean := goodClean(b)
	src := snpClaims(attest.PlatformSEVSNP, tcb, nil)
	dst := snpClaims(attest.PlatformSEVSNP, tcb, clean)
	host := HostInfo{Labels: map[string]string{"zone": "a"}, Region: "eu-west-1"}
	for _, bc := range []struct {
		name string
		p    *Policy
	}{
		{"rules", basePolicy(b, func(p *Policy) { p.Spec.Destination.HostLabels = map[string]string{"zone": "a"} })},
		{"rules+cel", basePolicy(b, withCEL(b, `destination.snp.reportedTcb.ucode >= source.snp.reportedTcb.ucode && host.region.startsWith("eu-")`))},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if d := evaluate(bc.p, src, dst, host, noCheck); !d.Allow {
					b.Fatal(d)
				}
			}
		})
	}
}
