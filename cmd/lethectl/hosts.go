package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/lethe-cc/lethe/broker"
	"github.com/spf13/cobra"
)

func newHostsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "hosts", Short: "Show the hosts registered with the broker"}
	cmd.AddCommand(newHostsListCmd())
	return cmd
}

func newHostsListCmd() *cobra.Command {
	var o brokerOpts
	var all bool
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List live hosts (with --all, also those whose heartbeat is stale)",
		Example: "  lethectl hosts list\n  lethectl hosts list --all -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ListHostsResponse, error) {
				return c.ListHosts(ctx, &broker.ListHostsRequest{All: all})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
				table(w, "HOST\tPLATFORM\tREGION\tLIVE\tGUESTS\tLABELS", func(tw io.Writer) {
					for _, h := range resp.Hosts {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%d\t%s\n", h.Host, h.Platform, h.Region, h.Live, len(h.Guests), labelsText(h.Labels))
					}
				})
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().BoolVar(&all, "all", false, "include hosts whose heartbeat is stale")
	return cmd
}

func labelsText(l map[string]string) string {
	kv := make([]string, 0, len(l))
	for k, v := range l {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}
