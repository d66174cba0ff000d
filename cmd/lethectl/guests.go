package main

import (
	"context"
	"fmt"
	"io"

	"github.com/lethe-cc/lethe/broker"
	"github.com/spf13/cobra"
)

func newGuestsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "guests", Short: "Adopt and list guests"}
	cmd.AddCommand(newGuestsListCmd(), newGuestsAdoptCmd())
	return cmd
}

func newGuestsListCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List adopted guests: host, epoch, migration in progress",
		Example: "  lethectl guests list --tenant acme",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ListGuestsResponse, error) {
				return c.ListGuests(ctx, &broker.ListGuestsRequest{})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
				table(w, "TENANT\tVM\tHOST\tPLATFORM\tEPOCH\tMIGRATION", func(tw io.Writer) {
					for _, g := range resp.Guests {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", g.Tenant, g.VM, g.Host, g.Platform, g.Epoch, g.Migration)
					}
				})
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

func newGuestsAdoptCmd() *cobra.Command {
	var o brokerOpts
	var host, forTenant string
	cmd := &cobra.Command{
		Use:   "adopt GUEST --host HOST",
		Short: "Take a guest in on its current host (its first residency, epoch 1)",
		Long: `Adopt a guest: the agent of HOST attests, and if the tenant's signed policy accepts
that host the keybroker creates the guest's first memory key and seals it to the agent.

Adopting a guest again on the host where it already lives (with no migration in progress)
reissues its current memory key to that host's agent, after the agent attests afresh: this
is how an agent that restarted gets the key back. On any other host it is refused.`,
		Example: "  lethectl guests adopt web --host h1 --tenant acme",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if host == "" {
				return fmt.Errorf("--host is required")
			}
			g, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Guest, error) {
				return c.AdoptGuest(ctx, &broker.AdoptGuestRequest{Tenant: forTenant, VM: args[0], Host: host})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), g, func(w io.Writer) {
				fmt.Fprintf(w, "adopted %s/%s on %s (epoch %d)\n", g.Tenant, g.VM, g.Host, g.Epoch)
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&host, "host", "", "the host the guest runs on")
	cmd.Flags().StringVar(&forTenant, "for", "", "operators: the tenant that owns the guest")
	return cmd
}
