package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/policy"
)

func newKeygenCmd() *cobra.Command {
	var out, output, name string
	cmd := &cobra.Command{
		Use:   "keygen --out DIR",
		Short: "Make an Ed25519 key pair: a tenant's policy key, its recovery key, or the admin key",
		Long: `keygen makes a new Ed25519 key pair: DIR/NAME.key (PKCS #8 PEM, mode 0600; keep it secret) and
DIR/NAME.pub (PKIX PEM). NAME is "tenant" by default: the tenant's policy-signing key (register
it with the keybroker). "recovery" makes a tenant's recovery key (register it with
--recovery-pub, keep it offline); "admin" the operator's admin key (give admin.pub to the
keybroker's --admin-pub). It never overwrites an existing key.`,
		Example: `  lethectl keygen --out ./keys
  lethectl policy sign --key ./keys/tenant.key policy.yaml --out policy.signed
  lethectl keygen --name admin --out ./admin`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			pub, err := policy.GenerateKeyNamed(out, name)
			if err != nil {
				return err
			}
			res := struct {
				PrivateKey string `json:"privateKey"`
				PublicKey  string `json:"publicKey"`
				KeyID      string `json:"keyId"`
			}{filepath.Join(out, name+".key"), filepath.Join(out, name+".pub"), policy.KeyID(pub)}
			w := cmd.OutOrStdout()
			if output == "json" {
				return json.NewEncoder(w).Encode(res)
			}
			fmt.Fprintf(w, "wrote %s (secret) and %s\nkey id %s\n", res.PrivateKey, res.PublicKey, res.KeyID)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "directory to write tenant.key and tenant.pub into (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	cmd.Flags().StringVar(&name, "name", "tenant", "key file name: tenant, recovery or admin (NAME.key and NAME.pub)")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

// checkPolicyOutput validates an --output value.
func checkPolicyOutput(output string) error {
	if output != "text" && output != "json" {
		return fmt.Errorf("--output %q: want text or json", output)
	}
	return nil
}
