package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/keybroker/receipt"
)

// newKeybrokerCmd is "lethectl keybroker": what a tenant or operator asks the keybroker
// itself, beside the residency log (lethectl log).
func newKeybrokerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keybroker",
		Short: "Ask the keybroker for its receipt-signing key",
	}
	cmd.AddCommand(newKeybrokerPubkeyCmd())
	return cmd
}

// keybrokerKey is what "lethectl keybroker pubkey" prints.
type keybrokerKey struct {
	KeyID     string `json:"keyId"`
	LogOrigin string `json:"logOrigin,omitempty"`
	PEM       string `json:"pem"`
	Written   string `json:"written,omitempty"`
}

func newKeybrokerPubkeyCmd() *cobra.Command {
	var (
		o   brokerOpts
		out string
	)
	cmd := &cobra.Command{
		Use:   "pubkey [--out FILE]",
		Short: "Fetch the keybroker's receipt-signing public key and the residency log's name",
		Long: `pubkey fetches, as a tenant (--tenant) or an operator, the public key that signs receipts, grants
and the residency log's checkpoints, and the log's name (its origin): what receipt verify,
guests history and log checkpoint take as --pub. Nothing but NATS vouches for the answer:
compare the key ID it prints with the one your provider publishes by another channel before
you pin the key. --out writes the key (PEM) to a file.`,
		Example: `  lethectl keybroker pubkey --tenant acme --out keybroker.pub`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, closeFn, err := o.keybroker()
			if err != nil {
				return err
			}
			defer closeFn()
			ctx, cancel := o.callCtx(cmd.Context())
			defer cancel()
			resp, err := c.PublicKey(ctx)
			if err != nil {
				return fmt.Errorf("fetching the keybroker's public key: %w", err)
			}
			pub, err := receipt.ParsePublicKeyPEM([]byte(resp.PEM))
			if err != nil {
				return fmt.Errorf("the keybroker's answer: %w", err)
			}
			k := keybrokerKey{KeyID: receipt.KeyID(pub), LogOrigin: resp.LogOrigin, PEM: resp.PEM}
			if out != "" {
				if err := writeFileAtomic(out, []byte(resp.PEM), 0o644); err != nil {
					return fmt.Errorf("writing the public key: %w", err)
				}
				k.Written = out
			}
			return o.show(cmd.OutOrStdout(), k, func(w io.Writer) {
				fmt.Fprintf(w, "key ID      %s\n", k.KeyID)
				if k.LogOrigin != "" {
					fmt.Fprintf(w, "log origin  %s\n", k.LogOrigin)
				}
				if out != "" {
					fmt.Fprintf(w, "written to  %s\n", out)
				} else {
					fmt.Fprint(w, k.PEM)
				}
				fmt.Fprintln(cmd.ErrOrStderr(), "Compare the key ID with the one your provider publishes by another channel (lethe-keybroker logs it as key_id) before you pin it.")
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&out, "out", "", "write the public key (PEM) to this file")
	return cmd
}
