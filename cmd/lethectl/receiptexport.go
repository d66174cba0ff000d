package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
)

// newReceiptExportCmd is "lethectl receipt export": it writes every receipt the broker keeps
// for the caller (a tenant: its own; an operator: every tenant's, or --tenant's) as JSON lines,
// one broker.Receipt a line, by migration id.
func newReceiptExportCmd() *cobra.Command {
	var o brokerOpts
	var out string
	cmd := &cobra.Command{
		Use:   "export",
		Short: "Write every receipt the broker keeps for a tenant as JSON lines",
		Long: `export writes the receipts the broker keeps (for --receipt-retention, for ever by default) as
JSON lines, one receipt a line, by migration id: a tenant gets its own, an operator every
tenant's. Each line holds the signed envelope ("envelope") and the residency log's proof
("log") as the keybroker sent them: verify them with "lethectl receipt verify".`,
		Example: "  lethectl receipt export --tenant acme --out acme-receipts.jsonl",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := cmd.OutOrStdout()
			var f *os.File
			if out != "" {
				var err error
				if f, err = os.Create(out); err != nil {
					return fmt.Errorf("creating %s: %w", out, err)
				}
				defer f.Close()
				w = f
			}
			enc := json.NewEncoder(w)
			req := &broker.ListReceiptsRequest{Limit: broker.MaxListLimit}
			n := 0
			err := callPages(cmd.Context(), &o, func(ctx context.Context, c *broker.Client, after string) (string, error) {
				req.After = after
				resp, err := c.ListReceipts(ctx, req)
				if err != nil {
					return "", err
				}
				for _, r := range resp.Receipts {
					if err := enc.Encode(r); err != nil {
						return "", fmt.Errorf("writing receipts: %w", err)
					}
					n++
				}
				return resp.Next, nil
			})
			if err != nil {
				return err
			}
			if f != nil {
				if err := f.Close(); err != nil {
					return fmt.Errorf("writing %s: %w", out, err)
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "%d receipts written to %s\n", n, out)
			}
			return nil
		},
	}
	addBrokerFlags(cmd, &o, false)
	cmd.Flags().StringVar(&out, "out", "", "write to this file instead of standard output")
	return cmd
}
