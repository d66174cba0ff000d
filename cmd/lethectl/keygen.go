package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/policy"
)

func newKeygenCmd() *cobra.Command {
	var out, output string
	cmd := &cobra.Command{
		Use:   "keygen --out DIR",
		Short: "Make a tenant's Ed25519 policy-signing key pair",
		Long: `keygen makes a new Ed25519 key pair for signing a tenant's migration policies: DIR/tenant.key
(PKCS #8 PEM, mode 0600; keep it secret) and DIR/tenant.pub (PKIX PEM; register it with the
keybroker). It never overwrites an existing key.`,
		Example: `  lethectl keygen --out ./keys
  lethectl policy sign --key ./keys/tenant.key policy.yaml --out policy.signed`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			pub, err := policy.GenerateKey(out)
			if err != nil {
				return err
			}
			res := struct {
				PrivateKey string `json:"privateKey"`
				PublicKey  string `json:"publicKey"`
				KeyID      string `json:"keyId"`
			}{filepath.Join(out, policy.PrivateKeyFile), filepath.Join(out, policy.PublicKeyFile), policy.KeyID(pub)}
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
