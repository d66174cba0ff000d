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
// receipt, and the residency log's proof that its ending was logged, from the broker. Without
// --output json it prints the signed envelope itself, ready for "lethectl receipt verify".
func newReceiptGetCmd() *cobra.Command {
	var o brokerOpts
	var out, logOut string
	cmd := &cobra.Command{
		Use:   "get MIGRATION",
		Short: "Fetch a migration's signed receipt and its log proof from the broker",
		Long: `get fetches a migration's signed receipt from the broker. --out writes the envelope to a file;
the keybroker's proof that the migration's ending is in the residency log (a log inclusion,
JSON) goes to --log-out, or, when only --out is given, beside it in FILE.log.json, where
"lethectl receipt verify FILE" finds it. With -o json, both are printed ("envelope", "log").
The broker keeps both as the keybroker sent them and vouches for neither: verify them.`,
		Example: `  lethectl receipt get mig-ABC --out receipt.json
  lethectl receipt verify receipt.json --pub keybroker.pub --migration mig-ABC --policy policy.signed --require-erased --require-logged`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Receipt, error) {
				return c.GetReceipt(ctx, args[0])
			})
			if err != nil {
				return err
			}
			logFile, err := saveReceipt(r, out, logOut)
			if err != nil {
				return err
			}
			if logOut != "" && logFile == "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s: the broker holds no log proof for this receipt; %s not written\n", r.MigrationID, logOut)
			}
			return o.show(cmd.OutOrStdout(), r, func(w io.Writer) {
				if out == "" {
					w.Write(append(r.Envelope, '\n'))
				} else {
					fmt.Fprintf(w, "%s: %s receipt written to %s\n", r.MigrationID, r.Outcome, out)
				}
				if logFile != "" {
					fmt.Fprintf(w, "%s: log proof written to %s\n", r.MigrationID, logFile)
				}
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&out, "out", "", "write the signed envelope to this file")
	cmd.Flags().StringVar(&logOut, "log-out", "", "write the log proof to this file (default with --out: FILE.log.json)")
	return cmd
}

// logProofSuffix names the log proof beside a receipt file: receipt get writes it there and
// receipt verify looks for it there.
const logProofSuffix = ".log.json"

// saveReceipt writes r's envelope to out and its log proof to logOut, or with out but no
// logOut to out+logProofSuffix; an empty name writes nothing. It returns the file the proof
// was written to, "" when none was (the broker holds none, or no file was named).
func saveReceipt(r *broker.Receipt, out, logOut string) (string, error) {
	if out != "" {
		if err := os.WriteFile(out, append(r.Envelope, '\n'), 0o644); err != nil {
			return "", fmt.Errorf("writing receipt: %w", err)
		}
		if logOut == "" {
			logOut = out + logProofSuffix
		}
	}
	if logOut == "" || len(r.Log) == 0 {
		return "", nil
	}
	if err := os.WriteFile(logOut, append(r.Log, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("writing log proof: %w", err)
	}
	return logOut, nil
}
