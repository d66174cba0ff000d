package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
)

func newHostsCordonCmd() *cobra.Command {
	var o brokerOpts
	var reason string
	cmd := &cobra.Command{
		Use:     "cordon HOST [--reason R]",
		Short:   "Keep new guests off a host; its guests stay (operators)",
		Example: "  lethectl hosts cordon h1 --reason \"firmware update\"",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.HostStateRecord, error) {
				return c.CordonHost(ctx, &broker.CordonRequest{Host: args[0], Reason: reason})
			})
			if err != nil {
				return operatorsOnly(&o, "hosts cordon", err)
			}
			return o.show(cmd.OutOrStdout(), st, func(w io.Writer) { printHostState(w, args[0], st) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&reason, "reason", "", "why, shown in hosts list and in placement's verdicts")
	return cmd
}

func newHostsUncordonCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:     "uncordon HOST",
		Short:   "Let guests land on a host again (operators; abort a drain of it first)",
		Example: "  lethectl hosts uncordon h1",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.HostStateRecord, error) {
				return c.UncordonHost(ctx, &broker.UncordonRequest{Host: args[0]})
			})
			if err != nil {
				return operatorsOnly(&o, "hosts uncordon", err)
			}
			return o.show(cmd.OutOrStdout(), st, func(w io.Writer) { printHostState(w, args[0], st) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

// printHostState writes a host's state after a cordon or uncordon. The broker answers with no
// record (schedulable) for a host nothing was ever said of.
func printHostState(w io.Writer, host string, st *broker.HostStateRecord) {
	if st == nil || st.State == "" {
		fmt.Fprintf(w, "%s: %s\n", host, broker.HostSchedulable)
		return
	}
	fmt.Fprintf(w, "%s: %s", st.Host, st.State)
	if st.Reason != "" {
		fmt.Fprintf(w, " (%s)", st.Reason)
	}
	fmt.Fprintf(w, " by %s since %s\n", st.By, st.Since.Format("2006-01-02T15:04:05Z07:00"))
}

func newHostsDrainCmd() *cobra.Command {
	var o brokerOpts
	var req broker.DrainRequest
	var wait bool
	cmd := &cobra.Command{
		Use:   "drain HOST [--max-parallel N] [--per-source N] [--per-destination N] [--timeout D] [--reason R] [--dry-run] [--wait]",
		Short: "Cordon a host and migrate every guest off it (operators)",
		Long: `Cordon HOST and migrate every guest off it, within the limits (migrations started by hand
count towards them too). Placement chooses each guest's destination by its tenant's policy,
free memory and TCB; a guest no host admits is stuck and stays, with the reason host by host.
The drain is a durable operation of the broker: it goes on without lethectl.

--dry-run shows the guests and where they would go, and cordons nothing. --wait follows the
drain: guests done, in flight, waiting, failed, stuck and skipped, memory moved and an ETA;
then every guest's fate.

` + fleetExitHelp,
		Example: "  lethectl hosts drain h1 --dry-run\n  lethectl hosts drain h1 --max-parallel 4 --per-destination 1 --reason \"kernel update\" --wait",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Host = args[0]
			return startFleetOp(cmd, &o, "hosts drain", req.DryRun, wait, func(ctx context.Context, c *broker.Client) (*broker.FleetOpResponse, error) {
				return c.Drain(ctx, &req)
			})
		},
	}
	addFleetOpFlags(cmd, &o, &req.Limits, &req.Timeout, &req.DryRun, &wait)
	cmd.Flags().StringVar(&req.Reason, "reason", "", "why, recorded in the operation and the host's state")
	return cmd
}

func newHostsEvacuateCmd() *cobra.Command {
	var o brokerOpts
	var req broker.EvacuateRequest
	var wait bool
	cmd := &cobra.Command{
		Use:   "evacuate --below-tcb TCB [--dry-run] [--wait] [--max-parallel N] [--per-source N] [--per-destination N] [--timeout D] [--reason R]",
		Short: "Drain every host whose TCB is below TCB onto hosts at or above it (operators)",
		Long: `Drain every host whose TCB is below --below-tcb onto hosts at or above it, as after a firmware
(TCB) update. TCB is an SEV-SNP TCB, bl=N,tee=N,snp=N,ucode=N (fmc=N first where the chip has
one), or a TDX TEE_TCB_SVN, 32 hex digits.

--dry-run lists the hosts below the TCB, their guests, the guests whose host is already below
the minimum TCB their tenant's policy states, and what the plan could not check; it moves
nothing. --wait follows the evacuation as hosts drain --wait does.

` + fleetExitHelp,
		Example: "  lethectl hosts evacuate --below-tcb bl=3,tee=0,snp=8,ucode=115 --dry-run\n  lethectl hosts evacuate --below-tcb 0b0b0300000000000000000000000000 --wait",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if req.BelowTCB == "" {
				return fmt.Errorf("--below-tcb is required: an SEV-SNP TCB (bl=N,tee=N,snp=N,ucode=N) or a TDX TEE_TCB_SVN (32 hex digits)")
			}
			if _, err := attest.ParseHostTCB(req.BelowTCB); err != nil {
				return fmt.Errorf("--below-tcb: %w", err)
			}
			return startFleetOp(cmd, &o, "hosts evacuate", req.DryRun, wait, func(ctx context.Context, c *broker.Client) (*broker.FleetOpResponse, error) {
				return c.Evacuate(ctx, &req)
			})
		},
	}
	addFleetOpFlags(cmd, &o, &req.Limits, &req.Timeout, &req.DryRun, &wait)
	f := cmd.Flags()
	f.StringVar(&req.BelowTCB, "below-tcb", "", "the TCB every host must reach: bl=N,tee=N,snp=N,ucode=N or 32 hex digits (TDX)")
	f.StringVar(&req.Reason, "reason", "", "why, recorded in the operation and the hosts' state")
	return cmd
}
