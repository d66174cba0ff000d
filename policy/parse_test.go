package policy

import (
	"crypto/sha256"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lethe-cc/lethe/attest"
)

const minimal = `apiVersion: lethe.dev/v1
kind: MigrationPolicy
metadata:
  tenant: acme
  name: db
  policySvn: 4
`

func TestParseMinimalTakesDefaults(t *testing.T) {
	p, err := Parse("min.yaml", []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(Defaults(), p.Spec); diff != "" {
		t.Errorf("spec of a policy that sets nothing (-defaults +got):\n%s", diff)
	}
	if diff := cmp.Diff(Metadata{Tenant: "acme", Name: "db", PolicySVN: 4}, p.Metadata); diff != "" {
		t.Errorf("metadata (-want +got):\n%s", diff)
	}
	if got, want := p.Digest(), sha256.Sum256([]byte(minimal)); got != want {
		t.Errorf("Digest() = %x, want SHA-256 of the bytes %x", got, want)
	}
}

func TestDefaults(t *testing.T) {
	d := Defaults()
	want := []any{
		d.Source.Platforms, []attest.Platform{attest.PlatformSEVSNP, attest.PlatformTDX},
		d.Destination.Platforms, []attest.Platform{attest.PlatformSEVSNP, attest.PlatformTDX},
		d.DestinationTCBAtLeastSource, true,
		d.Destination.Clean.RequireStatement, true,
		d.Source.SNP.AllowDebug || d.Source.TDX.AllowDebug || d.Destination.SNP.AllowDebug || d.Destination.TDX.AllowDebug, false,
		d.Source.SNP.AllowSMT, true,
		d.Source.SNP.AllowMigrateMA, false,
		d.Transport.CipherSuites, []string{CipherSuiteAES256GCM},
		d.Transport.AllowZeroPageElision, false,
		d.Transport.MaxDowntime, time.Duration(0),
		d.Erasure.Deadline, 10 * time.Minute,
		d.CEL, "",
	}
	for i := 0; i < len(want); i += 2 {
		if diff := cmp.Diff(want[i+1], want[i]); diff != "" {
			t.Errorf("default %d (-want +got):\n%s", i/2, diff)
		}
	}
}

func TestParseFull(t *testing.T) {
	src := minimal + `spec:
  source:
    platforms: [emulated-sev-snp]
    snp:
      minimumTcb: {bl: 1, tee: 2, snp: 3, ucode: 4}
      vmpl: 0
      hostData: 0x` + strings.Repeat("00", 32) + `
      measurements: [` + strings.Repeat("12", 48) + `]
  destination:
    platforms: [tdx]
    tdx:
      minimumTeeTcbSvn: "` + strings.Repeat("01", 16) + `"
      fmspcs: [123456789012]
    hostLabels: {zone: a}
    regions: [eu]
    clean: {launchMeasurement: ` + strings.Repeat("ab", 48) + `}
  destinationTcbAtLeastSource: false
  transport: {allowZeroPageElision: true, maxDowntime: 250ms, allowPostCopy: true}
  erasure: {deadline: 90s}
  cel: destination.platform == "tdx"
`
	p, err := Parse("full.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	want := Defaults()
	zero := uint32(0)
	want.Source.Platforms = []attest.Platform{attest.PlatformEmulatedSEVSNP}
	want.Source.SNP.MinimumTCB = attest.SNPTCB{BootLoader: 1, TEE: 2, SNP: 3, Microcode: 4}
	want.Source.SNP.VMPL = &zero
	want.Source.SNP.HostData = repeat(0, 32)
	want.Source.SNP.Measurements = []attest.HexBytes{repeat(0x12, 48)}
	want.Destination.Platforms = []attest.Platform{attest.PlatformTDX}
	want.Destination.TDX.MinimumTEETCBSVN = repeat(1, 16)
	want.Destination.TDX.FMSPCs = []attest.HexBytes{{0x12, 0x34, 0x56, 0x78, 0x90, 0x12}}
	want.Destination.HostLabels = map[string]string{"zone": "a"}
	want.Destination.Regions = []string{"eu"}
	want.Destination.Clean.LaunchMeasurement = repeat(0xab, 48)
	want.DestinationTCBAtLeastSource = false
	want.Transport.AllowZeroPageElision = true
	want.Transport.MaxDowntime = 250 * time.Millisecond
	want.Transport.AllowPostCopy = true
	want.Erasure.Deadline = 90 * time.Second
	want.CEL = `destination.platform == "tdx"`
	if diff := cmp.Diff(want, p.Spec); diff != "" {
		t.Errorf("spec (-want +got):\n%s", diff)
	}
	if p.cel == nil {
		t.Error("CEL expression not compiled")
	}
}

// TestParseErrorsGolden checks every bad file in testdata/bad gives the positioned errors of
// its golden file.
func TestParseErrorsGolden(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "bad", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no bad policies: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			_, err = Parse(filepath.Base(f), b)
			if err == nil {
				t.Fatal("parsed")
			}
			pes := ParseErrors(err)
			if len(pes) == 0 {
				t.Fatalf("no positioned errors in %v", err)
			}
			var lines []string
			for _, pe := range pes {
				lines = append(lines, pe.Error())
			}
			golden(t, filepath.Join("bad", strings.TrimSuffix(filepath.Base(f), ".yaml")+".golden"), strings.Join(lines, "\n")+"\n")
		})
	}
}

func TestParseErrorKinds(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []ParseError
	}{
		{"unknown field", minimal + "spec:\n  sorce: {}\n", []ParseError{{Line: 8, Column: 3, Path: "spec.sorce",
			Message: "unknown field, expected one of guests, source, destination, destinationTcbAtLeastSource, transport, erasure, cel"}}},
		{"wrong type", minimal + "spec:\n  destinationTcbAtLeastSource: 1\n", []ParseError{{Line: 8, Column: 32, Path: "spec.destinationTcbAtLeastSource",
			Message: "expected true or false, got an integer"}}},
		{"bad hex length", minimal + "spec:\n  destination:\n    snp:\n      hostData: abcd\n", []ParseError{{Line: 10, Column: 17, Path: "spec.destination.snp.hostData",
			Message: "expected 32 bytes as 64 hex digits, got 2 bytes"}}},
		{"not hex", minimal + "spec:\n  destination:\n    tdx:\n      xfam: zz\n", []ParseError{{Line: 10, Column: 13, Path: "spec.destination.tdx.xfam",
			Message: `expected 8 bytes as 16 hex digits, got "zz" (not hex)`}}},
		{"impossible range", minimal + "spec:\n  source:\n    snp:\n      vmpl: 4\n", []ParseError{{Line: 10, Column: 13, Path: "spec.source.snp.vmpl",
			Message: "expected an integer from 0 to 3, got 4"}}},
		{"overflow", minimal + "spec:\n  source:\n    tdx:\n      minimumQeSvn: 70000\n", []ParseError{{Line: 10, Column: 21, Path: "spec.source.tdx.minimumQeSvn",
			Message: "expected an integer from 0 to 65535, got 70000"}}},
		{"bad guest patterns", minimal + "spec:\n  guests: [web-1, 'Web', 'a*b', '-x', web-1, '', 7]\n", []ParseError{
			{Line: 8, Column: 19, Path: "spec.guests[1]", Message: `expected a VM name (lowercase letters, digits, '.', '_' and '-'), a prefix of one followed by '*', or '*', got "Web"`},
			{Line: 8, Column: 26, Path: "spec.guests[2]", Message: `expected a VM name (lowercase letters, digits, '.', '_' and '-'), a prefix of one followed by '*', or '*', got "a*b"`},
			{Line: 8, Column: 33, Path: "spec.guests[3]", Message: `expected a VM name (lowercase letters, digits, '.', '_' and '-'), a prefix of one followed by '*', or '*', got "-x"`},
			{Line: 8, Column: 39, Path: "spec.guests[4]", Message: `duplicate guest pattern "web-1"`},
			{Line: 8, Column: 46, Path: "spec.guests[5]", Message: `expected a VM name (lowercase letters, digits, '.', '_' and '-'), a prefix of one followed by '*', or '*', got ""`},
			{Line: 8, Column: 50, Path: "spec.guests[6]", Message: "expected a string, got an integer"},
		}},
		{"downtime limit too long", minimal + "spec:\n  transport: {maxDowntime: 1h}\n", []ParseError{{Line: 8, Column: 28, Path: "spec.transport.maxDowntime",
			Message: "expected 0 or a duration from 1ms to 10m0s, got 1h0m0s"}}},
		{"negative downtime limit", minimal + "spec:\n  transport: {maxDowntime: -1s}\n", []ParseError{{Line: 8, Column: 28, Path: "spec.transport.maxDowntime",
			Message: "expected 0 or a duration from 1ms to 10m0s, got -1s"}}},
		{"no platforms", minimal + "spec:\n  source:\n    platforms: []\n", []ParseError{{Line: 9, Column: 16, Path: "spec.source.platforms",
			Message: "expected at least one platform (sev-snp, tdx, emulated-sev-snp, emulated-tdx)"}}},
		{"destination field at source", minimal + "spec:\n  source:\n    regions: [eu]\n", []ParseError{{Line: 9, Column: 5, Path: "spec.source.regions",
			Message: "unknown field, expected one of platforms, snp, tdx"}}},
		{"duplicate", minimal + "spec:\n  cel: 'true'\n  cel: 'false'\n", []ParseError{{Line: 9, Column: 3, Message: `malformed YAML: mapping key "cel" already defined at [8:3]`}}},
		{"alias", minimal + "spec:\n  source: &s {platforms: [tdx]}\n  destination: *s\n", []ParseError{
			{Line: 8, Column: 11, Path: "spec.source", Message: "expected plain YAML, got an anchor (anchors, aliases and tags are not allowed)"},
			{Line: 9, Column: 16, Path: "spec.destination", Message: "expected plain YAML, got an alias (anchors, aliases and tags are not allowed)"},
		}},
		{"cel type", minimal + "spec:\n  cel: '1 + 2'\n", []ParseError{{Line: 8, Column: 8, Path: "spec.cel", Message: "expected a CEL expression of type bool, got int"}}},
		{"cel undeclared", minimal + "spec:\n  cel: 'src.platform == \"tdx\"'\n", []ParseError{{Line: 8, Column: 8, Path: "spec.cel",
			Message: "CEL 1:1: undeclared reference to 'src'"}}},
		{"two documents", minimal + "---\n" + minimal, []ParseError{{Line: 8, Column: 1, Message: "2 YAML documents, expected exactly one"}}},
		{"empty", "", []ParseError{{Line: 1, Column: 1, Message: "empty document, expected a MigrationPolicy"}}},
		{"missing metadata", "apiVersion: lethe.dev/v1\nkind: MigrationPolicy\n", []ParseError{
			{Line: 1, Column: 1, Path: "metadata.tenant", Message: `expected 1 to 63 lowercase letters, digits and dashes, starting and ending with a letter or digit, got ""`},
			{Line: 1, Column: 1, Path: "metadata.name", Message: `expected 1 to 63 lowercase letters, digits and dashes, starting and ending with a letter or digit, got ""`},
			{Line: 1, Column: 1, Path: "metadata.policySvn", Message: "expected an integer from 0 to 18446744073709551615, got nothing"},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("p.yaml", []byte(tc.src))
			if err == nil {
				t.Fatal("parsed")
			}
			var got []ParseError
			for _, pe := range ParseErrors(err) {
				got = append(got, *pe)
			}
			if diff := cmp.Diff(tc.want, got, cmpopts.IgnoreFields(ParseError{}, "File")); diff != "" {
				t.Errorf("errors (-want +got):\n%s\nerror: %v", diff, err)
			}
		})
	}
}

func TestCovers(t *testing.T) {
	tests := map[string]struct {
		guests []string
		vm     string
		want   bool
	}{
		"no selector covers nothing": {nil, "web-1", false},
		"exact name":                 {[]string{"payments-db"}, "payments-db", true},
		"exact name, other guest":    {[]string{"payments-db"}, "payments-db-2", false},
		"prefix":                     {[]string{"web-*"}, "web-blue", true},
		"prefix, bare prefix":        {[]string{"web-*"}, "web-", true},
		"prefix, other guest":        {[]string{"web-*"}, "webshop", false},
		"star":                       {[]string{"*"}, "anything", true},
		"one of several":             {[]string{"a", "b-*"}, "b-1", true},
		"empty vm":                   {[]string{"*"}, "", false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := CoversGuest(tc.guests, tc.vm); got != tc.want {
				t.Errorf("CoversGuest(%q, %q) = %v, want %v", tc.guests, tc.vm, got, tc.want)
			}
		})
	}
	p, err := Parse("p.yaml", []byte(minimal+"spec:\n  guests: [db, 'db-*']\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !p.Covers("db") || !p.Covers("db-replica") || p.Covers("web") {
		t.Errorf("policy with guests %q: Covers wrong", p.Spec.Guests)
	}
	if m, _ := Parse("m.yaml", []byte(minimal)); m.Covers("db") {
		t.Error("a policy without spec.guests covers a guest")
	}
}

func TestExamples(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "examples", "policies", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range files {
		names[filepath.Base(f)] = true
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			p, err := Parse(f, b)
			if err != nil {
				t.Fatal(err)
			}
			if !p.Spec.DestinationTCBAtLeastSource {
				t.Error("an example turns off destinationTcbAtLeastSource")
			}
			if len(p.Spec.Guests) == 0 {
				t.Error("an example covers no guest (spec.guests)")
			}
		})
	}
	for _, want := range []string{"snp-production.yaml", "tdx-production.yaml", "mixed.yaml", "ci-emulated.yaml"} {
		if !names[want] {
			t.Errorf("examples/policies/%s missing", want)
		}
	}
}

// TestCIEmulated checks the demo's policy does what the demo says: emulated platforms only,
// any measurement, no debug, destination TCB at least the source's.
func TestCIEmulated(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "examples", "policies", "ci-emulated.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse("ci-emulated.yaml", b)
	if err != nil {
		t.Fatal(err)
	}
	emulated := []attest.Platform{attest.PlatformEmulatedSEVSNP, attest.PlatformEmulatedTDX}
	if diff := cmp.Diff(emulated, p.Spec.Source.Platforms); diff != "" {
		t.Errorf("source platforms (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(emulated, p.Spec.Destination.Platforms); diff != "" {
		t.Errorf("destination platforms (-want +got):\n%s", diff)
	}
	clean := goodClean(t)
	up := attest.SNPTCB{BootLoader: 3, SNP: 0x14, Microcode: 0x15}
	if d := evaluate(p, snpClaims(attest.PlatformEmulatedSEVSNP, tcb, nil), snpClaims(attest.PlatformEmulatedSEVSNP, up, clean), HostInfo{}, noCheck); !d.Allow {
		t.Errorf("emulated move denied: %v", d)
	}
	if d := evaluate(p, snpClaims(attest.PlatformEmulatedSEVSNP, up, nil), snpClaims(attest.PlatformEmulatedSEVSNP, tcb, clean), HostInfo{}, noCheck); d.Allow {
		t.Error("move to a lower TCB allowed")
	}
	if d := evaluate(p, snpClaims(attest.PlatformSEVSNP, tcb, nil), snpClaims(attest.PlatformSEVSNP, tcb, clean), HostInfo{}, noCheck); d.Allow {
		t.Error("real hardware allowed by the emulated-only policy")
	}
	r := p.Spec.Source.Requirements()
	if r.SNP.AllowDebug || r.TDX.AllowDebug || len(r.SNP.Measurements) > 0 || len(r.TDX.MRTDs) > 0 {
		t.Errorf("source requirements %+v: want no debug and any measurement", r)
	}
}

// FuzzParse feeds Parse arbitrary bytes: it must return a policy or positioned errors, never
// panic.
func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	for _, pattern := range []string{"../examples/policies/*.yaml", "testdata/bad/*.yaml"} {
		files, _ := filepath.Glob(pattern)
		for _, file := range files {
			b, err := os.ReadFile(file)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
	}
	f.Add([]byte("a: &a [*a, *a]\n"))
	f.Add([]byte("{{{{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse("fuzz.yaml", b)
		if err == nil {
			if p.Metadata.Tenant == "" || len(p.Spec.Source.Platforms) == 0 {
				t.Fatalf("parsed an invalid policy: %+v", p)
			}
			return
		}
		if len(ParseErrors(err)) == 0 {
			t.Fatalf("error without position: %v", err)
		}
	})
}
