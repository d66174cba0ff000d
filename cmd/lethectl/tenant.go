package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/hashicorp/vault/api"
	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/policy"
)

func newTenantCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tenant",
		Short: "Register tenants with the keybroker (admin)",
		Long: `Tenant commands are admin calls to the keybroker: they change what it trusts, so they need the
keybroker's admin credential.`,
	}
	cmd.AddCommand(newTenantRegisterCmd())
	return cmd
}

func newTenantRegisterCmd() *cobra.Command {
	var (
		tenant, pubFile, adminTokenFile, vaultAddr, kvMount, output string
		replace                                                     bool
	)
	cmd := &cobra.Command{
		Use:   "register --tenant NAME --pub tenant.pub",
		Short: "Register a tenant's policy-signing public key",
		Long: `register records a tenant's Ed25519 policy-signing public key (lethectl keygen writes it) in
the keybroker's store, beside the keys in Vault. From then on the keybroker accepts only policies
signed by that key, with a policySvn not lower than the last it accepted. Re-registering the same
key does nothing; another key needs --replace (the tenant's policySvn is kept).

For now the call runs the keybroker's core in-process: it reaches Vault at --vault-addr (or
VAULT_ADDR) with the token in VAULT_TOKEN, and checks the admin token read from
--admin-token-file (or LETHE_ADMIN_TOKEN) against the one the running lethe-keybroker
published (its --admin-token-file).`,
		Example: `  export VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=... LETHE_ADMIN_TOKEN=...
  lethectl tenant register --tenant demo --pub ./keys/tenant.pub`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			pub, err := policy.ReadPublicKey(pubFile)
			if err != nil {
				return err
			}
			admin := os.Getenv("LETHE_ADMIN_TOKEN")
			if adminTokenFile != "" {
				b, err := os.ReadFile(adminTokenFile)
				if err != nil {
					return fmt.Errorf("reading admin token: %w", err)
				}
				admin = strings.TrimSpace(string(b))
			}
			if admin == "" {
				return errors.New("no admin token: set --admin-token-file or LETHE_ADMIN_TOKEN")
			}
			vcfg := api.DefaultConfig()
			if vaultAddr != "" {
				vcfg.Address = vaultAddr
			}
			vc, err := api.NewClient(vcfg)
			if err != nil {
				return fmt.Errorf("creating Vault client: %w", err)
			}
			// Registration verifies no evidence; the core requires a verifier all the same.
			v, err := attest.NewVerifier(attest.Config{})
			if err != nil {
				return err
			}
			// The admin token is checked against the one the running keybroker published.
			kb, err := keybroker.New(keybroker.Config{Vault: vc, Verifier: v, KVMount: kvMount})
			if err != nil {
				return err
			}
			resp, err := kb.RegisterTenant(cmd.Context(), admin, keybroker.RegisterTenantRequest{Tenant: tenant, PolicyKey: pub, Replace: replace})
			if err != nil {
				return err
			}
			if output == "json" {
				return writeReceiptJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "registered tenant %s (key %s, policySvn %d)\n", resp.Tenant, policy.KeyID(pub), resp.PolicySVN)
			return nil
		},
	}
	cmd.Flags().StringVar(&tenant, "tenant", "", "tenant name: lowercase letters, digits and dashes (required)")
	cmd.Flags().StringVar(&pubFile, "pub", "", "the tenant's public key, PEM (required)")
	cmd.Flags().BoolVar(&replace, "replace", false, "replace the key of a tenant already registered")
	cmd.Flags().StringVar(&adminTokenFile, "admin-token-file", "", "file holding the keybroker's admin token (default: $LETHE_ADMIN_TOKEN)")
	cmd.Flags().StringVar(&vaultAddr, "vault-addr", "", "Vault address (default: $VAULT_ADDR)")
	cmd.Flags().StringVar(&kvMount, "kv-mount", "", "the keybroker's KV v2 mount (default: lethe)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("tenant")
	_ = cmd.MarkFlagRequired("pub")
	return cmd
}
