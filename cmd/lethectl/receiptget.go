package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
)

// newReceiptGetCmd is "lethectl receipt get MIGRATION": it fetches a migration's signed
// receipt from the broker. Without --output json it prints the signed envelope itself, ready
// for "lethectl receipt verify".
func newReceiptGetCmd() *cobra.Command {
	var o brokerOpts
	var out string
	cmd := &cobra.Command{
		Use:   "get MIGRATION",
		Short: "Fetch a migration's signed receipt from the broker",
		Example: `  lethectl receipt get mig-ABC --out receipt.json
  lethectl receipt verify receipt.json --pub keybroker.pub --migration mig-ABC --policy policy.signed --require-erased`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Receipt, error) {
				return c.GetReceipt(ctx, args[0])
			})
			if err != nil {
				return err
			}
			if out != "" {
				if err := os.WriteFile(out, append(r.Envelope, '\n'), 0o644); err != nil {
					return fmt.Errorf("writing receipt: %w", err)
				}
			}
			return o.show(cmd.OutOrStdout(), r, func(w io.Writer) {
				if out != "" {
					fmt.Fprintf(w, "%s: %s receipt written to %s\n", r.MigrationID, r.Outcome, out)
					return
				}
				w.Write(append(r.Envelope, '\n'))
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&out, "out", "", "write the signed envelope to this file")
	return cmd
}
