package main

import (
	"bufio"
	"crypto/ed25519"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/policy"
)

// TestMigrationsEvents: the tenant reads its migration's events, as text and as JSON lines;
// another tenant finds no such migration.
func TestMigrationsEvents(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web").AutoCommit = true
	f.addHost("h2", 120)
	out, errOut, code := f.run("migrate", "web", "--to", "h2", "--wait", "--tenant", "acme", "-o", "json")
	if code != 0 {
		t.Fatalf("migrate: exit %d: %s", code, errOut)
	}
	var m broker.Migration
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}

	out, errOut, code = f.run("migrations", "events", m.ID, "--follow", "--tenant", "acme")
	if code != 0 {
		t.Fatalf("events: exit %d: %s", code, errOut)
	}
	for _, want := range []string{"phase     Attesting (after ", "progress  precopy round 1: 1.0 MiB of 1.0 MiB sent", "phase     Erased"} {
		if !strings.Contains(out, want) {
			t.Errorf("events lack %q:\n%s", want, out)
		}
	}

	out, errOut, code = f.run("migrations", "events", m.ID, "-o", "json")
	if code != 0 {
		t.Fatalf("events -o json: exit %d: %s", code, errOut)
	}
	var last uint64
	lines := 0
	for sc := bufio.NewScanner(strings.NewReader(out)); sc.Scan(); lines++ {
		var ev broker.StoredEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		if ev.Seq <= last || ev.Event.MigrationID != m.ID {
			t.Errorf("event %+v after sequence %d", ev, last)
		}
		last = ev.Seq
	}
	if lines < 7 {
		t.Errorf("%d events as JSON, want the 7 phases and more:\n%s", lines, out)
	}

	if _, errOut, code := f.run("migrations", "events", m.ID, "--tenant", "globex"); code == 0 || !strings.Contains(errOut, "not found") {
		t.Errorf("another tenant: exit %d: %s", code, errOut)
	}
}

// TestPolicyGetAndHistory: a tenant reads the signed policy the broker holds, its YAML and its
// revisions; an operator names the tenant; another tenant cannot read it.
func TestPolicyGetAndHistory(t *testing.T) {
	f := newFleet(t)
	yaml, err := os.ReadFile(examplePolicy)
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	env, err := policy.Sign(examplePolicy, yaml, priv)
	if err != nil {
		t.Fatal(err)
	}
	signed, err := env.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	demo := broker.NewTenantClient(f.connect(natsauth.RoleTenant, "demo"), "demo")
	for range 2 {
		if _, err := demo.ApplyPolicy(t.Context(), &broker.ApplyPolicyRequest{Envelope: signed}); err != nil {
			t.Fatal(err)
		}
	}
	p, err := policy.Parse(examplePolicy, yaml)
	if err != nil {
		t.Fatal(err)
	}
	digest := summarize("", p, "").Digest

	out, errOut, code := f.run("policy", "get", "--vm", "web", "--tenant", "demo")
	if code != 0 {
		t.Fatalf("policy get: exit %d: %s", code, errOut)
	}
	for _, want := range []string{"Key:       demo (tenant-wide of tenant demo)", "Policy:    ci-emulated (policySvn 1)", "Digest:    " + digest, "Signed by: " + policy.KeyID(pub), "Revision:  2"} {
		if !strings.Contains(out, want) {
			t.Errorf("policy get lacks %q:\n%s", want, out)
		}
	}
	out, _, code = f.run("policy", "get", "--tenant", "demo", "-o", "yaml")
	if code != 0 || out != string(yaml) {
		t.Errorf("policy get -o yaml: exit %d:\n%s", code, out)
	}
	out, errOut, code = f.run("policy", "history", "--for", "demo", "-o", "json")
	if code != 0 {
		t.Fatalf("policy history: exit %d: %s", code, errOut)
	}
	var hist []heldPolicy
	if err := json.Unmarshal([]byte(out), &hist); err != nil {
		t.Fatal(err)
	}
	if len(hist) != 2 || hist[0].Revision >= hist[1].Revision || hist[1].Digest != digest || hist[1].PolicySVN != 1 {
		t.Errorf("history: %s", out)
	}
	if _, errOut, code := f.run("policy", "get", "--tenant", "globex", "--for", "demo"); code == 0 || !strings.Contains(errOut, "not found") {
		t.Errorf("another tenant's policy: exit %d: %s", code, errOut)
	}
}
