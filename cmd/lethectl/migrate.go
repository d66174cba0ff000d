package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
)

func newMigrateCmd() *cobra.Command {
	var o brokerOpts
	var to, forTenant string
	var dryRun, wait bool
	cmd := &cobra.Command{
		Use:   "migrate GUEST [--to HOST] [--dry-run] [--wait]",
		Short: "Migrate a guest to another host",
		Long: `Request a live migration of GUEST. Without --to the broker picks a host that passes the
tenant's policy pre-filter. --dry-run reports, for every host, whether it would pass and why
not, and starts nothing. --wait follows the migration with a progress line on stderr (memory
sent, round, throughput, elapsed time, dirty rate, time left or "not converging"), redrawn in
place and fitted to the width on a terminal, plain lines elsewhere, and ends with a summary
(elapsed time, data moved, rounds, downtime, the receipt); an aborted migration exits with
status 1.`,
		Example: "  lethectl migrate web --to h2 --wait --tenant acme\n  lethectl migrate web --dry-run",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, closeFn, err := o.client()
			if err != nil {
				return err
			}
			defer closeFn()
			ctx, cancel := o.callCtx(cmd.Context())
			resp, err := c.CreateMigration(ctx, &broker.CreateMigrationRequest{Tenant: forTenant, VM: args[0], Destination: to, DryRun: dryRun})
			cancel()
			if err != nil {
				return err
			}
			if dryRun {
				d := resp.DryRun
				return o.show(cmd.OutOrStdout(), d, func(w io.Writer) {
					fmt.Fprintf(w, "guest %s/%s on %s (%s), policy %s\n", d.Tenant, d.VM, d.Source, d.Platform, d.PolicyKey)
					for _, n := range d.Notes {
						fmt.Fprintf(w, "note: %s\n", n)
					}
					table(w, "HOST\tPRE-FILTER\tWHY NOT", func(tw io.Writer) {
						for _, v := range d.Hosts {
							verdict := "fails"
							if v.Pass {
								verdict = "passes"
							}
							fmt.Fprintf(tw, "%s\t%s\t%s\n", v.Host, verdict, strings.Join(v.Reasons, "; "))
						}
					})
				})
			}
			m := resp.Migration
			if !wait {
				return o.show(cmd.OutOrStdout(), m, func(w io.Writer) {
					fmt.Fprintf(w, "%s: %s/%s %s → %s requested\n", m.ID, m.Tenant, m.VM, m.Source, m.Destination)
				})
			}
			if o.output != "json" {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s/%s %s → %s\n", m.ID, m.Tenant, m.VM, m.Source, m.Destination)
			}
			return watchMigration(cmd.Context(), &o, c, m.ID, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	addBrokerFlags(cmd, &o, true)
	f := cmd.Flags()
	f.StringVar(&to, "to", "", "destination host (default: one the broker chooses)")
	f.StringVar(&forTenant, "for", "", "operators: the tenant that owns the guest")
	f.BoolVar(&dryRun, "dry-run", false, "only report which hosts would pass the policy pre-filter")
	f.BoolVar(&wait, "wait", false, "follow the migration's progress until it ends, then print a summary")
	return cmd
}
