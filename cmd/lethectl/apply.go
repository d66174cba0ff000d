package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/lethe-cc/lethe/broker"
	"github.com/spf13/cobra"
)

// newPolicyApplyCmd is "lethectl policy apply SIGNED": it stores a signed policy envelope with
// the broker, which keeps it as signed (the keybroker verifies it at each release).
func newPolicyApplyCmd() *cobra.Command {
	var o brokerOpts
	var vmName, forTenant string
	cmd := &cobra.Command{
		Use:     "apply SIGNED",
		Short:   "Store a signed policy with the broker (tenant-wide, or for one VM with --vm)",
		Example: "  lethectl policy apply policy.signed.json --tenant acme\n  lethectl policy apply web.signed.json --vm web",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			envelope, err := os.ReadFile(args[0])
			if err != nil {
				return fmt.Errorf("reading signed policy: %w", err)
			}
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ApplyPolicyResponse, error) {
				return c.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Tenant: forTenant, VM: vmName, Envelope: envelope})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
				fmt.Fprintf(w, "applied %s (revision %d)\n", resp.Key, resp.Revision)
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&vmName, "vm", "", "scope the policy to one VM")
	cmd.Flags().StringVar(&forTenant, "for", "", "operators: the tenant whose signed policy this is")
	return cmd
}
