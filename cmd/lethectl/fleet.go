package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lethe-cc/lethe/broker"
)

// exitNotAllMoved is lethectl's exit status when a fleet operation it followed ended with a
// guest that did not move (failed, stuck or skipped).
const exitNotAllMoved = 1

// fleetExitHelp says, in every --help of a command that follows a fleet operation, what its
// exit status means.
const fleetExitHelp = `Exit status: 0 when every guest moved; 1 when any guest failed, was stuck (no host admits
it) or was skipped (the operation was aborted or timed out before its turn); 130 when
interrupted (the operation goes on in the broker).`

// addFleetOpFlags adds the flags of a command that starts a fleet operation: the broker flags
// (the timeout of one broker call as --call-timeout, for --timeout bounds the operation), the
// migration limits, --reason, --dry-run and --wait.
func addFleetOpFlags(cmd *cobra.Command, o *brokerOpts, limits *broker.Limits, timeout *time.Duration, dryRun, wait *bool) {
	f := cmd.Flags()
	addNATSFlags(f, o)
	f.StringVar(&o.Tenant, "tenant", "", "act as this tenant; fleet operations need an operator (env LETHE_TENANT)")
	f.DurationVar(&o.Timeout, "call-timeout", 30*time.Second, "timeout of one broker call")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	addLimitFlags(f, limits)
	f.DurationVar(timeout, "timeout", 0, "end the operation after this long: no migration starts after it (default none)")
	f.BoolVar(dryRun, "dry-run", false, "only show the plan; cordon and move nothing")
	f.BoolVar(wait, "wait", false, "follow the operation until it ends, then list every guest")
}

func addLimitFlags(f *pflag.FlagSet, l *broker.Limits) {
	f.IntVar(&l.MaxParallel, "max-parallel", 0, "most migrations in flight across the cluster (default: the broker's)")
	f.IntVar(&l.PerSource, "per-source", 0, "most migrations out of one host at once (default: the broker's)")
	f.IntVar(&l.PerDestination, "per-destination", 0, "most migrations into one host at once (default: the broker's)")
}

// operatorsOnly turns a call's error into one a person can act on: a fleet operation is
// served on operator subjects alone, so called with tenant credentials it gets no answer at
// all, which says nothing of why.
func operatorsOnly(o *brokerOpts, command string, err error) error {
	if err == nil || o.Tenant == "" || !errors.Is(err, broker.ErrUnavailable) {
		return err
	}
	return fmt.Errorf("lethectl %s needs operator credentials: the broker serves it to operators only, and this call was made as tenant %s (--tenant, LETHE_TENANT or the config file): %w", command, o.Tenant, err)
}

// startFleetOp runs a drain, evacuation or rebalance call, prints its answer (the plan for a
// dry run, the operation started otherwise) and, with wait, follows the operation.
func startFleetOp(cmd *cobra.Command, o *brokerOpts, command string, dryRun, wait bool,
	call func(context.Context, *broker.Client) (*broker.FleetOpResponse, error)) error {
	c, closeFn, err := o.client()
	if err != nil {
		return err
	}
	defer closeFn()
	ctx, cancel := o.callCtx(cmd.Context())
	resp, err := call(ctx, c)
	cancel()
	if err != nil {
		return operatorsOnly(o, command, err)
	}
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	v := resp.Operation
	if dryRun || !wait {
		return o.show(stdout, resp, func(w io.Writer) {
			printPlan(w, resp)
			if !dryRun {
				fmt.Fprintf(w, "%s: %s started; follow it with `lethectl fleet watch %s`, abort it with `lethectl fleet abort %s`\n", v.ID, fleetTarget(v), v.ID, v.ID)
			}
		})
	}
	if o.output != "json" {
		printPlan(stderr, resp)
		fmt.Fprintf(stderr, "%s: %s started\n", v.ID, fleetTarget(v))
	}
	return watchFleetOp(cmd.Context(), o, c, v.ID, stdout, stderr)
}

// fleetTarget names what an operation does: "drain of h1".
func fleetTarget(v *broker.FleetOpView) string {
	s := string(v.Kind)
	if v.Kind == broker.FleetEvacuate && v.MinTCB != nil {
		s += " below TCB " + v.MinTCB.String()
	}
	if len(v.Hosts) > 0 {
		s += " of " + strings.Join(v.Hosts, ",")
	}
	return s
}

// guests counts guests in words: "1 guest", "2 guests".
func guests(n int) string {
	if n == 1 {
		return "1 guest"
	}
	return fmt.Sprintf("%d guests", n)
}

// printPlan writes what an operation moves: the hosts concerned, committed memory before and
// after as a share of what they may give guests, each guest's move, and, for an evacuation's
// dry run, the guests whose policy no longer admits their host and what the plan could not do.
func printPlan(w io.Writer, resp *broker.FleetOpResponse) {
	v := resp.Operation
	if v == nil {
		return
	}
	verb := "moves"
	if v.State == "" {
		verb = "would move"
	}
	fmt.Fprintf(w, "%s %s %s (%s)\n", fleetTarget(v), verb, guests(len(v.Items)), bytesText(v.Counts.BytesTotal))
	if p := resp.Plan; p != nil && len(p.Hosts) > 0 {
		table(w, "HOST\tTCB\tALLOCATABLE\tCOMMITTED BEFORE → AFTER", func(tw io.Writer) {
			for _, h := range p.Hosts {
				tcb := "-"
				if h.TCB != nil {
					tcb = h.TCB.String()
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s → %s\n", h.Host, tcb, allocText(h.AllocatableBytes),
					shareText(h.CommittedBefore, h.AllocatableBytes), shareText(h.CommittedAfter, h.AllocatableBytes))
			}
		})
	}
	if len(v.Items) > 0 {
		table(w, "TENANT/VM\tFROM → TO\tMEMORY\tSTATUS\tREASON", func(tw io.Writer) {
			for _, it := range v.Items {
				fmt.Fprintf(tw, "%s/%s\t%s → %s\t%s\t%s\t%s\n", it.Tenant, it.VM, it.From, toText(it.To), bytesText(it.MemoryBytes), it.Status, it.Reason)
			}
		})
	}
	if p := resp.Plan; p != nil {
		if len(p.PolicyViolations) > 0 {
			fmt.Fprintln(w, "Guests on a host their policy no longer admits:")
			table(w, "  TENANT/VM\tHOST\tREASON", func(tw io.Writer) {
				for _, pv := range p.PolicyViolations {
					fmt.Fprintf(tw, "  %s/%s\t%s\t%s\n", pv.Tenant, pv.VM, pv.Host, pv.Reason)
				}
			})
		}
		for _, n := range p.Notes {
			fmt.Fprintf(w, "note: %s\n", n)
		}
	}
}

// toText is a guest's destination: placement's choice while none is planned.
func toText(to string) string {
	if to == "" {
		return "(placement)"
	}
	return to
}

// allocText is a host's allocatable memory, "-" when not reported (or not shown).
func allocText(b uint64) string {
	if b == 0 {
		return "-"
	}
	return bytesText(b)
}

// shareText is committed memory and its share of allocatable: "3.0 GiB (75%)".
func shareText(committed, allocatable uint64) string {
	if allocatable == 0 {
		return bytesText(committed)
	}
	return fmt.Sprintf("%s (%.0f%%)", bytesText(committed), float64(committed)*100/float64(allocatable))
}

// watchFleetOp polls a fleet operation, drawing its progress on stderr, until it ends, then
// prints every guest's fate. It ends lethectl with exitNotAllMoved when a guest did not move.
// Interrupted (Ctrl-C or SIGTERM), it says that the operation goes on and how to follow or
// abort it, and ends with status 130.
func watchFleetOp(ctx context.Context, o *brokerOpts, c *broker.Client, id string, stdout, stderr io.Writer) error {
	out := newProgressOut(stderr, o.output != "json")
	v, stopped, err := follow(ctx, o, out,
		func(ctx context.Context) (*broker.FleetOpView, error) { return c.GetFleetOp(ctx, id) },
		func(v *broker.FleetOpView) bool {
			out.show(fleetProgressKey(v), fleetProgressLine(v))
			return v.State.Terminal()
		})
	switch {
	case stopped:
		return fleetInterrupted(stderr, id, v)
	case err != nil:
		return operatorsOnly(o, "fleet watch", err)
	}
	if err := o.show(stdout, v, func(w io.Writer) { printFleetResult(w, v) }); err != nil {
		return err
	}
	if v.Counts.Moved != v.Counts.Total {
		return &exitError{code: exitNotAllMoved}
	}
	return nil
}

// fleetProgressKey is what changes an operation's progress enough for a new plain line: its
// state or a guest's status.
func fleetProgressKey(v *broker.FleetOpView) string {
	c := v.Counts
	return fmt.Sprintf("%s/%d/%d/%d/%d/%d/%d", v.State, c.Moved, c.Migrating, c.Waiting, c.Failed, c.Stuck, c.Skipped)
}

// fleetProgressLine renders an operation's progress on one line.
func fleetProgressLine(v *broker.FleetOpView) string {
	c := v.Counts
	line := fmt.Sprintf("%s %s: %d/%d done, %d in flight, %d waiting, %d failed, %d stuck, %d skipped; %s of %s moved",
		v.ID, v.State, c.Moved, c.Total, c.Migrating, c.Waiting, c.Failed, c.Stuck, c.Skipped, bytesText(c.BytesMoved), bytesText(c.BytesTotal))
	if v.ETA > 0 && !v.State.Terminal() {
		line += "; ETA " + v.ETA.Round(time.Second).String()
	}
	return line
}

// printFleetResult writes how an operation ended and every guest's fate.
func printFleetResult(w io.Writer, v *broker.FleetOpView) {
	c := v.Counts
	fmt.Fprintf(w, "%s: %s %s: %d moved, %d failed, %d stuck, %d skipped of %s\n",
		v.ID, fleetTarget(v), v.State, c.Moved, c.Failed, c.Stuck, c.Skipped, guests(c.Total))
	if v.AbortReason != "" {
		fmt.Fprintf(w, "aborted: %s\n", v.AbortReason)
	}
	printFleetItems(w, v.Items)
}

// printFleetItems writes a table of an operation's guests and, when a migration finished, how
// to fetch its receipt.
func printFleetItems(w io.Writer, items []broker.FleetItem) {
	if len(items) == 0 {
		return
	}
	receipts := false
	table(w, "TENANT/VM\tFROM → TO\tSTATUS\tOUTCOME\tMIGRATION\tREASON", func(tw io.Writer) {
		for _, it := range items {
			fmt.Fprintf(tw, "%s/%s\t%s → %s\t%s\t%s\t%s\t%s\n", it.Tenant, it.VM, it.From, toText(it.To), it.Status,
				dash(it.Outcome), dash(it.Migration), it.Reason)
			receipts = receipts || (it.Outcome != "" && it.Migration != "")
		}
	})
	if receipts {
		fmt.Fprintln(w, "receipts: lethectl receipt get <migration-id>")
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// fleetInterrupted tells, when lethectl stops following a fleet operation (Ctrl-C), that the
// operation goes on without it, and how to follow or abort it.
func fleetInterrupted(w io.Writer, id string, v *broker.FleetOpView) error {
	where := "still running"
	if v != nil {
		where = fmt.Sprintf("%s, %d of %s moved", v.State, v.Counts.Moved, guests(v.Counts.Total))
	}
	fmt.Fprintf(w, "interrupted: fleet operation %s goes on (%s); follow it with `lethectl fleet watch %s`, abort it with `lethectl fleet abort %s`\n", id, where, id, id)
	return &exitError{code: 130}
}

func newRebalanceCmd() *cobra.Command {
	var o brokerOpts
	var req broker.RebalanceRequest
	var threshold float64
	var wait bool
	cmd := &cobra.Command{
		Use:   "rebalance [--max-moves N] [--threshold PERCENT] [--dry-run] [--wait]",
		Short: "Move guests off hosts whose committed memory is above a threshold (operators)",
		Long: `Plan moves that bring every host's committed memory under --threshold percent of its
allocatable memory, show the plan (each host's committed memory before → after, and the moves),
and run them. With --dry-run only the plan is shown. --wait follows the operation: guests done,
in flight, waiting, failed, stuck and skipped, memory moved and an ETA, then every guest's fate.

` + fleetExitHelp,
		Example: "  lethectl rebalance --dry-run\n  lethectl rebalance --threshold 70 --max-moves 5 --wait",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if threshold < 0 || threshold > 100 {
				return fmt.Errorf("--threshold %v: want a percentage between 0 and 100", threshold)
			}
			if req.MaxMoves < 0 {
				return fmt.Errorf("--max-moves %d: want a positive number", req.MaxMoves)
			}
			req.Threshold = threshold / 100
			return startFleetOp(cmd, &o, "rebalance", req.DryRun, wait, func(ctx context.Context, c *broker.Client) (*broker.FleetOpResponse, error) {
				return c.Rebalance(ctx, &req)
			})
		},
	}
	addFleetOpFlags(cmd, &o, &req.Limits, &req.Timeout, &req.DryRun, &wait)
	f := cmd.Flags()
	f.IntVar(&req.MaxMoves, "max-moves", 0, "most guests the plan moves (default 10)")
	f.Float64Var(&threshold, "threshold", 0, "percentage of a host's allocatable memory that may be committed (default: the broker's)")
	return cmd
}

func newFleetCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "fleet", Short: "List, show, watch and abort fleet operations (drain, evacuate, rebalance; operators)"}
	cmd.AddCommand(newFleetListCmd(), newFleetGetCmd(), newFleetWatchCmd(), newFleetAbortCmd())
	return cmd
}

func newFleetListCmd() *cobra.Command {
	var o brokerOpts
	var active bool
	cmd := &cobra.Command{
		Use:     "list [--active]",
		Short:   "List fleet operations, newest first",
		Example: "  lethectl fleet list --active",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ListFleetOpsResponse, error) {
				return c.ListFleetOps(ctx, &broker.ListFleetOpsRequest{Active: active})
			})
			if err != nil {
				return operatorsOnly(&o, "fleet list", err)
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
				table(w, "ID\tKIND\tSTATE\tHOSTS\tMOVED\tFAILED\tSTUCK\tSKIPPED\tCREATED", func(tw io.Writer) {
					for _, v := range resp.Operations {
						c := v.Counts
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%d\t%d\t%d\t%s\n", v.ID, v.Kind, v.State, dash(strings.Join(v.Hosts, ",")),
							c.Moved, c.Total, c.Failed, c.Stuck, c.Skipped, v.Created.Format(time.RFC3339))
					}
				})
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().BoolVar(&active, "active", false, "only operations running or aborting")
	return cmd
}

func newFleetGetCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:     "get ID",
		Short:   "Show a fleet operation and every guest in it",
		Example: "  lethectl fleet get op-ABC -o json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.FleetOpView, error) {
				return c.GetFleetOp(ctx, args[0])
			})
			if err != nil {
				return operatorsOnly(&o, "fleet get", err)
			}
			return o.show(cmd.OutOrStdout(), v, func(w io.Writer) { printFleetOp(w, v) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

// printFleetOp writes a fleet operation and its guests.
func printFleetOp(w io.Writer, v *broker.FleetOpView) {
	fmt.Fprintf(w, "Operation:    %s\nKind:         %s\nState:        %s\nRequested by: %s at %s\n",
		v.ID, fleetTarget(v), v.State, v.RequestedBy, v.Created.Format(time.RFC3339))
	if v.Reason != "" {
		fmt.Fprintf(w, "Reason:       %s\n", v.Reason)
	}
	if l := v.Limits; l != (broker.Limits{}) {
		fmt.Fprintf(w, "Limits:       %d in flight, %d per source, %d per destination\n", l.MaxParallel, l.PerSource, l.PerDestination)
	}
	if !v.Deadline.IsZero() {
		fmt.Fprintf(w, "Deadline:     %s\n", v.Deadline.Format(time.RFC3339))
	}
	fmt.Fprintf(w, "Progress:     %s\n", fleetProgressLine(v))
	if v.AbortReason != "" {
		fmt.Fprintf(w, "Abort reason: %s\n", v.AbortReason)
	}
	if !v.Finished.IsZero() {
		fmt.Fprintf(w, "Finished:     %s\n", v.Finished.Format(time.RFC3339))
	}
	printFleetItems(w, v.Items)
}

func newFleetWatchCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:   "watch ID",
		Short: "Follow a fleet operation until it ends, then list every guest",
		Long: `Follow a fleet operation: guests done, in flight, waiting, failed, stuck and skipped, memory
moved and an ETA; then every guest's fate.

` + fleetExitHelp,
		Example: "  lethectl fleet watch op-ABC",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, closeFn, err := o.client()
			if err != nil {
				return err
			}
			defer closeFn()
			return watchFleetOp(cmd.Context(), &o, c, args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

func newFleetAbortCmd() *cobra.Command {
	var o brokerOpts
	var reason string
	cmd := &cobra.Command{
		Use:   "abort ID [--reason R]",
		Short: "Abort a fleet operation: no migration starts any more, those in flight are aborted where they can be",
		Long: `Abort a fleet operation. No migration starts any more; those in flight are aborted where they
still can be (a committed one finishes). Hosts it cordoned stay cordoned: uncordon them with
lethectl hosts uncordon.`,
		Example: "  lethectl fleet abort op-ABC --reason wrong-host",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.FleetOpView, error) {
				return c.AbortFleetOp(ctx, &broker.AbortFleetOpRequest{ID: args[0], Reason: reason})
			})
			if err != nil {
				return operatorsOnly(&o, "fleet abort", err)
			}
			return o.show(cmd.OutOrStdout(), v, func(w io.Writer) { fmt.Fprintf(w, "%s: %s\n", v.ID, v.State) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the operation")
	return cmd
}
