package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/broker"
)

// complete runs cobra's hidden __complete command as a shell's completion script does and
// returns the completions offered, without their descriptions.
func complete(t *testing.T, args ...string) []string {
	t.Helper()
	out, errOut, code := runLethectl(t, append([]string{"__complete"}, args...)...)
	// cobra reports the directive on stderr, for debugging; anything more is an error
	// the shell would show.
	if rest := strings.TrimSpace(strings.ReplaceAll(errOut, "Completion ended with directive: ShellCompDirectiveNoFileComp", "")); code != 0 || rest != "" {
		t.Fatalf("__complete %q: exit %d\n%s", args, code, errOut)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(line, ":") {
			break // the directive
		}
		name, _, _ := strings.Cut(line, "\t")
		names = append(names, name)
	}
	return names
}

func TestCompletionLiveNames(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web", "db").AutoCommit = true
	f.addHost("h2", 120)
	url := f.srv.URL
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"hosts", "cordon", "--nats-url", url, ""}, []string{"h1", "h2"}},
		{[]string{"hosts", "drain", "--nats-url", url, "h2"}, []string{"h2"}},
		{[]string{"hosts", "cordon", "h1", "--nats-url", url, ""}, nil},
		{[]string{"migrate", "--nats-url", url, "--tenant", "acme", ""}, []string{"db", "web"}},
		{[]string{"migrate", "web", "--nats-url", url, "--to", ""}, []string{"h1", "h2"}},
		{[]string{"guests", "list", "-o", ""}, []string{"text", "json"}},
		{[]string{"hosts", "list", "--output", ""}, []string{"text", "wide", "json"}},
		// Without a broker: nothing, no error, at once.
		{[]string{"hosts", "cordon", "--nats-url", "nats://127.0.0.1:1", ""}, nil},
	} {
		if got := complete(t, tc.args...); !slices.Equal(got, tc.want) {
			t.Errorf("completing %q = %q, want %q", tc.args, got, tc.want)
		}
	}

	if out, errOut, code := f.run("hosts", "drain", "h1", "--wait"); code != 0 {
		t.Fatalf("drain --wait: exit %d\n%s%s", code, out, errOut)
	}
	out, _, _ := f.run("fleet", "list", "-o", "json")
	var ops broker.ListFleetOpsResponse
	if err := json.Unmarshal([]byte(out), &ops); err != nil || len(ops.Operations) != 1 {
		t.Fatalf("fleet list -o json: %v, %s", err, out)
	}
	if got := complete(t, "fleet", "get", "--nats-url", url, ""); !slices.Equal(got, []string{ops.Operations[0].ID}) {
		t.Errorf("completing a fleet operation id = %q, want [%s]", got, ops.Operations[0].ID)
	}
	out, _, _ = f.run("migrations", "list", "-o", "json")
	var migs broker.ListMigrationsResponse
	if err := json.Unmarshal([]byte(out), &migs); err != nil || len(migs.Migrations) != 2 {
		t.Fatalf("migrations list -o json: %v, %s", err, out)
	}
	var ids []string
	for _, m := range migs.Migrations {
		ids = append(ids, m.ID)
	}
	slices.Sort(ids)
	if got := complete(t, "migrations", "get", "--nats-url", url, ""); !slices.Equal(got, ids) {
		t.Errorf("completing a migration id = %q, want %q", got, ids)
	}
	if got := complete(t, "migrations", "abort", "--nats-url", url, ""); len(got) != 0 {
		t.Errorf("completing a migration to abort offers finished ones: %q", got)
	}
}

func TestManPages(t *testing.T) {
	dir := t.TempDir()
	if _, errOut, code := runLethectl(t, "man", dir); code != 0 {
		t.Fatalf("man: exit %d: %s", code, errOut)
	}
	page, err := os.ReadFile(filepath.Join(dir, "lethectl-hosts-drain.1"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{".TH \"LETHECTL-HOSTS-DRAIN\" 1", ".SH SYNOPSIS\n.B lethectl hosts drain HOST", ".SH OPTIONS\n", `\fB--dry-run\fP`, `\fBlethectl-hosts\fP(1)`} {
		if !strings.Contains(string(page), want) {
			t.Errorf("lethectl-hosts-drain.1 lacks %q:\n%s", want, page)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "lethectl-man.1")); err == nil {
		t.Error("the hidden man command has a man page")
	}
}
