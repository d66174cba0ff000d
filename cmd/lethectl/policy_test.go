package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/policy"
)

// runLethectl runs lethectl in-process and returns its stdout, stderr and exit code.
func runLethectl(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := newRootCmd()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(t.Context())
	switch ee, ok := errors.AsType[*exitError](err); {
	case err == nil:
	case ok:
		code = ee.code
	default:
		errOut.WriteString(err.Error())
		code = 1
	}
	return out.String(), errOut.String(), code
}

const examplePolicy = "../../examples/policies/ci-emulated.yaml"

func TestPolicyKeygenSignVerifyLint(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	signedFile := filepath.Join(dir, "policy.signed")

	if out, errOut, code := runLethectl(t, "keygen", "--out", keys); code != 0 {
		t.Fatalf("keygen: exit %d\n%s%s", code, out, errOut)
	}
	if fi, err := os.Stat(filepath.Join(keys, "tenant.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("tenant.key: %v %v", fi, err)
	}
	if _, _, code := runLethectl(t, "keygen", "--out", keys); code == 0 {
		t.Error("keygen overwrote a key")
	}

	out, errOut, code := runLethectl(t, "policy", "sign", "--key", filepath.Join(keys, "tenant.key"), examplePolicy, "--out", signedFile)
	if code != 0 {
		t.Fatalf("sign: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runLethectl(t, "policy", "verify", "--pub", filepath.Join(keys, "tenant.pub"), signedFile, "--output", "json")
	if code != 0 {
		t.Fatalf("verify: exit %d\n%s%s", code, out, errOut)
	}
	var s policySummary
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("verify --output json: %v\n%s", err, out)
	}
	if diff := cmp.Diff(policySummary{File: signedFile, Tenant: "demo", Name: "ci-emulated", PolicySVN: 1, Signature: "verified"}, s, cmpIgnoreDigest); diff != "" {
		t.Errorf("verify (-want +got):\n%s", diff)
	}
	if _, _, code := runLethectl(t, "policy", "verify", "--pub", filepath.Join(keys, "tenant.pub"), signedFile, "--last-svn", "2"); code != 1 {
		t.Errorf("verify --last-svn 2 of policySvn 1: exit %d, want 1", code)
	}

	// Another tenant's key does not verify it.
	if _, _, code := runLethectl(t, "keygen", "--out", filepath.Join(dir, "other")); code != 0 {
		t.Fatal("keygen other")
	}
	if _, errOut, code := runLethectl(t, "policy", "verify", "--pub", filepath.Join(dir, "other", "tenant.pub"), signedFile); code != 1 || !strings.Contains(errOut, "no valid signature") {
		t.Errorf("verify with another key: exit %d, %s", code, errOut)
	}

	// A tampered envelope does not verify.
	b, err := os.ReadFile(signedFile)
	if err != nil {
		t.Fatal(err)
	}
	var env policy.Envelope
	if err := json.Unmarshal(b, &env); err != nil {
		t.Fatal(err)
	}
	env.Payload = bytes.Replace(env.Payload, []byte("policySvn: 1"), []byte("policySvn: 2"), 1)
	tampered, _ := json.Marshal(env)
	tamperedFile := filepath.Join(dir, "tampered.signed")
	if err := os.WriteFile(tamperedFile, tampered, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, code := runLethectl(t, "policy", "verify", "--pub", filepath.Join(keys, "tenant.pub"), tamperedFile); code != 1 {
		t.Errorf("verify of a tampered policy: exit %d, want 1", code)
	}

	// Lint: the signed policy's payload and the YAML are fine; a bad file exits 1 with positions.
	for _, f := range []string{examplePolicy, signedFile} {
		if out, errOut, code := runLethectl(t, "policy", "lint", f); code != 0 || !strings.Contains(out, ": ok, policy demo/ci-emulated") {
			t.Errorf("lint %s: exit %d\n%s%s", f, code, out, errOut)
		}
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("apiVersion: lethe.dev/v1\nkind: MigrationPolicy\nmetadata: {tenant: a, name: b, policySvn: 1}\nspec:\n  source:\n    snp: {vmpl: 9}\n  colour: blue\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = runLethectl(t, "policy", "lint", bad)
	wantErr := bad + ":6:17: spec.source.snp.vmpl: expected an integer from 0 to 3, got 9\n" +
		bad + ":7:3: spec.colour: unknown field, expected one of guests, source, destination, destinationTcbAtLeastSource, transport, erasure, cel\n"
	if code != 1 || errOut != wantErr {
		t.Errorf("lint bad: exit %d, stderr:\n%s\nwant:\n%s", code, errOut, wantErr)
	}
	if _, _, code := runLethectl(t, "policy", "sign", "--key", filepath.Join(keys, "tenant.key"), bad, "--out", filepath.Join(dir, "bad.signed")); code != 1 {
		t.Errorf("sign of a bad policy: exit %d, want 1", code)
	}
	if _, err := os.Stat(filepath.Join(dir, "bad.signed")); err == nil {
		t.Error("a bad policy was signed")
	}

	out, _, code = runLethectl(t, "policy", "lint", "--show-defaults")
	if code != 0 || out != string(policy.DefaultsYAML) {
		t.Errorf("lint --show-defaults: exit %d, printed %d bytes, want DefaultsYAML", code, len(out))
	}
}

var cmpIgnoreDigest = cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".Digest" }, cmp.Ignore())

func TestCommandsHaveExamples(t *testing.T) {
	for _, c := range append([]*cobra.Command{newKeygenCmd()}, newPolicyCmd().Commands()...) {
		if c.Example == "" {
			t.Errorf("%s has no Example", c.CommandPath())
		}
	}
}

// TestPolicyTestEmulated runs `policy test` on evidence of two emulated hosts: one that the
// demo's policy accepts, and one it refuses with a reason.
func TestPolicyTestEmulated(t *testing.T) {
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots")
	write := func(name string, opts emulate.Options, stmt []byte) string {
		t.Helper()
		e, err := emulate.Open(roots, attest.PlatformEmulatedSEVSNP, opts)
		if err != nil {
			t.Fatalf("emulating SEV-SNP: %v", err)
		}
		ev, err := attest.Produce(t.Context(), e, attest.Binding{MigrationID: "m1", Role: attest.RoleDestination, Nonce: make([]byte, 32), Statement: stmt})
		if err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	clean, err := attest.CleanMemoryStatement{Zeroed: true, VerifiedZero: true, Bytes: 1 << 30}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	tcb := attest.SNPTCB{BootLoader: 3, SNP: 20, Microcode: 20}
	older := attest.SNPTCB{BootLoader: 3, SNP: 20, Microcode: 18}
	src := write("src.json", emulate.Options{TCB: &tcb}, nil)
	good := write("good.json", emulate.Options{TCB: &tcb}, clean)
	weak := write("weak.json", emulate.Options{TCB: &older}, clean)

	out, errOut, code := runLethectl(t, "policy", "test", examplePolicy, "--source", src, "--destination", good, "--trust-roots", roots)
	if code != 0 || !strings.HasPrefix(out, "allow: ") {
		t.Errorf("policy test, good destination: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runLethectl(t, "policy", "test", examplePolicy, "--source", src, "--destination", weak, "--trust-roots", roots)
	if code != 1 || !strings.Contains(out, "destination snp.tcb.microcode 0x12 < source 0x14") {
		t.Errorf("policy test, weaker destination: exit %d\n%s%s", code, out, errOut)
	}
	out, _, code = runLethectl(t, "policy", "test", examplePolicy, "--source", src, "--destination", good, "--output", "json")
	var res testResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("--output json: %v\n%s", err, out)
	}
	if code != 1 || res.Decision.Allow || len(res.Decision.Reasons) == 0 || res.Decision.Reasons[0].Rule != "source.evidence" {
		t.Errorf("policy test without the emulator's roots: exit %d, %+v", code, res.Decision)
	}
}

// TestPolicyApplyAnswersUpFront: apply refuses, before anything is sent, an unsigned policy
// (saying how to sign it) and a policy of another tenant than the one you act as.
func TestPolicyApplyAnswersUpFront(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("LETHECTL_CONFIG", "")
	t.Setenv("LETHE_CONFIG", "")
	t.Setenv("XDG_CONFIG_HOME", dir)
	t.Setenv("LETHE_TENANT", "")
	keys := filepath.Join(dir, "keys")
	signed := filepath.Join(dir, "policy.signed")
	if _, _, code := runLethectl(t, "keygen", "--out", keys); code != 0 {
		t.Fatal("keygen failed")
	}
	if _, _, code := runLethectl(t, "policy", "sign", "--key", filepath.Join(keys, "tenant.key"), examplePolicy, "--out", signed); code != 0 {
		t.Fatal("sign failed")
	}
	nowhere := []string{"--nats-url", "nats://127.0.0.1:1", "--timeout", "1s"}
	tests := map[string]struct {
		args []string
		want string
	}{
		"unsigned":       {[]string{examplePolicy}, "is a policy that is not signed: sign it first (lethectl policy sign --key TENANT.key"},
		"another tenant": {[]string{signed, "--tenant", "acme"}, "is tenant demo's policy; you act as tenant acme"},
		"operator --for": {[]string{signed, "--for", "acme"}, "is tenant demo's policy, not acme's (--for)"},
		"nobody named":   {[]string{signed}, "is tenant demo's policy: apply it as that tenant (--tenant demo), or as an operator for it (--for demo"},
		"not a policy":   {[]string{filepath.Join(keys, "tenant.pub")}, "reading signed policy"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, errOut, code := runLethectl(t, append(append([]string{"policy", "apply"}, tc.args...), nowhere...)...)
			if code == 0 || !strings.Contains(errOut, tc.want) {
				t.Errorf("exit %d, stderr %q; want it to say %q", code, errOut, tc.want)
			}
		})
	}
}
