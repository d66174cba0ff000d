package main

import (
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// TestVaultReadyChecksMounts checks /readyz's Vault check against a real Vault: ready with
// both mounts, and not ready, naming the mount and how to enable it, when one is missing or
// of the wrong kind.
func TestVaultReadyChecksMounts(t *testing.T) {
	v := vaulttest.Start(t)
	ctx := t.Context()
	if err := vaultReady(ctx, v.Client, "", ""); err != nil {
		t.Fatalf("vaultReady with both mounts = %v, want nil", err)
	}
	sys := v.Client.Sys()
	// The keybroker's own token, with a policy on its two mounts and nothing else, is enough.
	if err := sys.PutPolicyWithContext(ctx, "lethe-keybroker", `
path "transit/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "lethe/*" { capabilities = ["create", "read", "update", "delete", "list"] }
`); err != nil {
		t.Fatal(err)
	}
	tok, err := v.Client.Auth().Token().CreateWithContext(ctx, &api.TokenCreateRequest{Policies: []string{"lethe-keybroker"}, NoDefaultPolicy: true})
	if err != nil {
		t.Fatal(err)
	}
	kc, err := vaulttest.NewClient(v.Addr, tok.Auth.ClientToken)
	if err != nil {
		t.Fatal(err)
	}
	if err := vaultReady(ctx, kc, "", ""); err != nil {
		t.Fatalf("vaultReady with the keybroker's policy = %v, want nil", err)
	}
	if err := sys.MountWithContext(ctx, "kv1", &api.MountInput{Type: "kv", Options: map[string]string{"version": "1"}}); err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		transit, kv string
		want        []string
	}{
		"other transit mount missing": {transit: "transit-eu", want: []string{"vault has no transit mount at transit-eu/ (vault secrets enable -path=transit-eu transit)"}},
		"KV v1 instead of v2":         {kv: "kv1", want: []string{"vault mount kv1/ is kv v1, want kv v2 (vault secrets enable -path=kv1 kv-v2)"}},
		"Transit where KV is wanted":  {kv: "transit", want: []string{"vault mount transit/ is transit, want kv v2"}},
		"both missing": {transit: "t2", kv: "k2", want: []string{
			"vault has no transit mount at t2/", "vault has no kv mount at k2/ (vault secrets enable -path=k2 kv-v2)"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := vaultReady(ctx, v.Client, tc.transit, tc.kv)
			if err == nil {
				t.Fatal("vaultReady = nil, want an error naming the mount")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("vaultReady = %q, want it to contain %q", err, w)
				}
			}
		})
	}
	if err := sys.UnmountWithContext(ctx, vaulttest.KVMount); err != nil {
		t.Fatal(err)
	}
	err = vaultReady(ctx, v.Client, "", "")
	if err == nil || !strings.Contains(err.Error(), "vault has no kv mount at lethe/ (vault secrets enable -path=lethe kv-v2)") {
		t.Errorf("vaultReady without the lethe mount = %v, want it named", err)
	}
}
