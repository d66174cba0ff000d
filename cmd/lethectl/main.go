// Command lethectl is the command-line client of Lethe for tenants and operators: it emulates
// and verifies attestation evidence, writes, signs and tests migration policies, (with a
// broker) adopts guests, migrates them, fetches and verifies their receipts and (operators)
// cordons, drains, evacuates and rebalances hosts, and (with a keybroker) fetches and
// verifies a guest's residency history, checkpoints of the residency log and their
// consistency, and runs a witness of that log.
//
// lethectl never holds a guest key. Its offline commands (attest verify, policy test,
// receipt verify, guests history --from-bundle) need nothing but the files they are given.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "lethectl:", err)
		os.Exit(1)
	}
}

// exitError ends lethectl with a code after its output has been printed; nothing more is
// printed for it.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "lethectl",
		Short: "Lethe's client: attestation, policies, migrations and receipts",
		Long: `lethectl is the command-line client of Lethe, the broker for live migration of
confidential VMs (AMD SEV-SNP and Intel TDX guests).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.String("lethectl"),
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.AddCommand(newAttestCmd(), newPolicyCmd(), newKeygenCmd(), newReceiptCmd(), newTenantCmd())
	root.AddCommand(newHostsCmd(), newGuestsCmd(), newMigrateCmd(), newMigrationsCmd(), newLogCmd(), newKeybrokerCmd())
	root.AddCommand(newRebalanceCmd(), newFleetCmd(), newAuditCmd())
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print lethectl's version (as --version does)",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), version.String("lethectl"))
		},
	})
	root.AddCommand(newManCmd())
	addCompletions(root)
	return root
}
