package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/lethe-cc/lethe/broker"
	"github.com/spf13/cobra"
)

func newHostsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "hosts", Short: "Show the hosts registered with the broker; cordon, drain and evacuate them (operators)"}
	cmd.AddCommand(newHostsListCmd(), newHostsCordonCmd(), newHostsUncordonCmd(), newHostsDrainCmd(), newHostsEvacuateCmd())
	return cmd
}

func newHostsListCmd() *cobra.Command {
	var o brokerOpts
	var all bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List live hosts (with --all, also those whose heartbeat is stale)",
		Long: `List the hosts registered with the broker: their state (schedulable, cordoned, draining,
maintenance; -o wide adds who set it and why), the memory they may give guests (ALLOCATABLE),
the memory their guests hold (COMMITTED, with what is arriving in +), their TCB, and their
migrations in flight (IN/OUT). A tenant sees its own guests and whether it may land on a host,
not the memory nor the operator's reasons.`,
		Example: "  lethectl hosts list\n  lethectl hosts list -o wide\n  lethectl hosts list --all -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			wide := o.output == "wide"
			if wide {
				o.output = "text"
			}
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ListHostsResponse, error) {
				return c.ListHosts(ctx, &broker.ListHostsRequest{All: all})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) { printHosts(w, resp.Hosts, wide) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().Lookup("output").Usage = "output format: text, wide (adds the state's reason) or json"
	cmd.Flags().BoolVar(&all, "all", false, "include hosts whose heartbeat is stale")
	return cmd
}

// printHosts writes a table of hosts; wide adds who set each host's state, and why.
func printHosts(w io.Writer, hosts []broker.HostView, wide bool) {
	header := "HOST\tPLATFORM\tREGION\tLIVE\tSTATE\tGUESTS\tALLOCATABLE\tCOMMITTED\tTCB\tIN/OUT\tLABELS"
	if wide {
		header += "\tSTATE BY\tREASON"
	}
	table(w, header, func(tw io.Writer) {
		for _, h := range hosts {
			committed := "-"
			if h.AllocatableBytes > 0 || h.CommittedBytes > 0 {
				committed = shareText(h.CommittedBytes, h.AllocatableBytes)
			}
			if h.ArrivingBytes > 0 {
				committed += " +" + bytesText(h.ArrivingBytes)
			}
			tcb := "-"
			if h.TCB != nil {
				tcb = h.TCB.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\t%d\t%s\t%s\t%s\t%d/%d\t%s", h.Host, h.Platform, h.Region, h.Live, cmp.Or(h.State, broker.HostSchedulable),
				len(h.Guests), allocText(h.AllocatableBytes), committed, tcb, h.Incoming, h.Outgoing, dash(labelsText(h.Labels)))
			if wide {
				by, reason := "-", "-"
				if st := h.StateRecord; st != nil {
					by, reason = dash(st.By), dash(st.Reason)
				}
				fmt.Fprintf(tw, "\t%s\t%s", by, reason)
			}
			fmt.Fprintln(tw)
		}
	})
}

func labelsText(l map[string]string) string {
	kv := make([]string, 0, len(l))
	for k, v := range l {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}
