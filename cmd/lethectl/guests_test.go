package main

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/policy"
)

// terminal makes confirm take stdin for a terminal (tty) or not, for the test.
func terminal(t *testing.T, tty bool) {
	t.Helper()
	saved := isTerminal
	isTerminal = func(io.Reader) bool { return tty }
	t.Cleanup(func() { isTerminal = saved })
}

// report makes host's agent report guests of tenant acme (none: their VMs were deleted).
func (f *fleet) report(host string, vms ...string) {
	f.t.Helper()
	var guests []agentapi.HostGuest
	for _, vm := range vms {
		guests = append(guests, agentapi.HostGuest{Tenant: "acme", VM: vm, MemoryBytes: 1 << 20})
	}
	rec := f.agents[host].Record("eu", nil, guests...)
	rec.AllocatableBytes, rec.MemoryBytes = 4<<30, 8<<30
	rec.TCB = &attest.HostTCB{SNP: &attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115}}
	nc := f.connect(natsauth.RoleAgent, host)
	if err := agentapi.PutHost(context.Background(), nc, &rec); err != nil {
		f.t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		f.t.Fatal(err)
	}
}

// TestGuestsForget: lethectl signs the forget (the tenant's key, or the admin's for an
// operator) and the broker passes it to the keybroker (here brokertest's, which verifies
// nothing: the real one's checks are keybroker's tests).
func TestGuestsForget(t *testing.T) {
	f := newFleet(t)
	f.addHost("h1", 115, "web", "db", "api")
	f.report("h1", "db") // web's and api's VMs were deleted
	keys := t.TempDir()
	for _, name := range []string{"tenant", "admin"} {
		if _, err := policy.GenerateKeyNamed(keys, name); err != nil {
			t.Fatal(err)
		}
	}
	tenantKey, adminKey := filepath.Join(keys, "tenant.key"), filepath.Join(keys, "admin.key")
	t.Setenv("LETHE_ADMIN_KEY", "")

	terminal(t, false)
	_, errOut, code := f.run("guests", "forget", "web", "--for", "acme", "--admin-key", adminKey)
	if code == 0 || !strings.Contains(errOut, "forgetting acme/web: stdin is not a terminal to confirm on: pass --yes") {
		t.Errorf("forget in a script without --yes: exit %d, %q; want a refusal asking for --yes", code, errOut)
	}
	_, errOut, code = f.run("guests", "forget", "web", "--for", "acme", "--yes")
	if code == 0 || !strings.Contains(errOut, "no key to sign the forget with") {
		t.Errorf("forget with no key: exit %d, %q; want a refusal asking for a key", code, errOut)
	}
	_, errOut, code = f.run("guests", "forget", "web", "--tenant", "globex", "--for", "acme", "--key", tenantKey, "--yes")
	if code == 0 || !strings.Contains(errOut, "not_found") && !strings.Contains(errOut, "not found") {
		t.Errorf("tenant globex forgetting acme's guest: exit %d, %q; want not found", code, errOut)
	}
	_, errOut, code = f.run("guests", "forget", "db", "--for", "acme", "--admin-key", adminKey, "--yes")
	if code == 0 || !strings.Contains(errOut, "host h1 is live and still runs guest acme.db") {
		t.Errorf("forgetting a running guest: exit %d, %q; want a refusal", code, errOut)
	}
	out, _, _ := f.run("guests", "list")
	if !strings.Contains(out, "acme    web") {
		t.Fatalf("a refused forget dropped the guest:\n%s", out)
	}

	out, errOut, code = f.run("guests", "forget", "web", "--tenant", "acme", "--key", tenantKey, "--reason", "VM deleted", "--yes")
	if code != 0 || out != "forgot acme/web (was on h1, epoch 1); its key is destroyed\n" {
		t.Fatalf("forget --key --yes: exit %d, %q %q", code, out, errOut)
	}
	t.Setenv("LETHE_ADMIN_KEY", adminKey)
	out, errOut, code = f.run("guests", "forget", "api", "--for", "acme", "--yes")
	if code != 0 || out != "forgot acme/api (was on h1, epoch 1); its key is destroyed\n" {
		t.Fatalf("forget by an operator with $LETHE_ADMIN_KEY: exit %d, %q %q", code, out, errOut)
	}
	out, _, _ = f.run("guests", "list")
	if strings.Contains(out, "web") || strings.Contains(out, "api") || !strings.Contains(out, "acme    db") {
		t.Errorf("guests list after forgetting web and api:\n%s", out)
	}
	forgets := f.kb.Forgets()
	if len(forgets) != 2 {
		t.Fatalf("the keybroker was asked %d forgets, want 2", len(forgets))
	}
	for i, want := range []string{kbwire.TenantPayloadType, kbwire.AdminPayloadType} {
		if typ, err := kbwire.StatementType(forgets[i].Signed); err != nil || typ != want {
			t.Errorf("forget %d signed as %q (%v), want %q", i, typ, err, want)
		}
	}
}

func TestConfirm(t *testing.T) {
	tests := map[string]struct {
		tty    bool
		answer string
		want   bool
		err    error
	}{
		"y":           {tty: true, answer: "y\n", want: true},
		"YES":         {tty: true, answer: " YES \n", want: true},
		"no":          {tty: true, answer: "n\n"},
		"empty":       {tty: true, answer: "\n"},
		"end of file": {tty: true},
		"other":       {tty: true, answer: "sure\n"},
		"no terminal": {answer: "y\n", err: errNoTerminal},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			terminal(t, tt.tty)
			var prompt strings.Builder
			got, err := confirm(strings.NewReader(tt.answer), &prompt, "Forget guest acme/web?")
			if got != tt.want || !errors.Is(err, tt.err) {
				t.Errorf("confirm = %v, %v; want %v, %v", got, err, tt.want, tt.err)
			}
			if tt.tty && prompt.String() != "Forget guest acme/web? [y/N] " {
				t.Errorf("prompt %q", prompt.String())
			}
			if !tt.tty && prompt.Len() != 0 {
				t.Errorf("asked %q with no terminal to answer", prompt.String())
			}
		})
	}
}
