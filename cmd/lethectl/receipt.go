package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/keybroker/receipt"
)

func newReceiptCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "receipt",
		Short: "Verify and show erasure receipts",
		Long: `A receipt is what the keybroker signs when a migration ends and its keys are destroyed:
which keys, when, and what both ends' evidence said. It verifies offline with nothing but the
keybroker's public key (lethe-keybroker --export-pub writes it).`,
	}
	cmd.AddCommand(newReceiptVerifyCmd(), newReceiptShowCmd(), newReceiptGetCmd())
	return cmd
}

func newReceiptVerifyCmd() *cobra.Command {
	var pubFile, output string
	cmd := &cobra.Command{
		Use:   "verify RECEIPT --pub keybroker.pub",
		Short: "Check a receipt's signature offline and print its statements",
		Long: `verify checks that RECEIPT is signed by the keybroker key in --pub and is a complete receipt,
then prints what it states. It needs no network. It exits 0 only when the receipt is valid.`,
		Example: `  lethectl receipt verify m-42.receipt --pub keybroker.pub
  lethectl receipt verify m-42.receipt --pub keybroker.pub -o json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			pb, err := os.ReadFile(pubFile)
			if err != nil {
				return fmt.Errorf("reading public key: %w", err)
			}
			pub, err := receipt.ParsePublicKeyPEM(pb)
			if err != nil {
				return err
			}
			env, err := readReceipt(args[0])
			if err != nil {
				return err
			}
			r, err := receipt.Verify(env, pub)
			if err != nil {
				if errors.Is(err, receipt.ErrInvalid) {
					fmt.Fprintf(cmd.OutOrStdout(), "INVALID: %v\n", err)
					return &exitError{code: 1}
				}
				return err
			}
			if output == "json" {
				return writeReceiptJSON(cmd.OutOrStdout(), r)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "VALID: signed by keybroker key %s\n", receipt.KeyID(pub))
			printReceipt(cmd.OutOrStdout(), r)
			return nil
		},
	}
	cmd.Flags().StringVar(&pubFile, "pub", "", "the keybroker's receipt-signing public key, PEM (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("pub")
	return cmd
}

func newReceiptShowCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show RECEIPT",
		Short: "Print a receipt's contents without verifying it",
		Long: `show decodes RECEIPT and prints its JSON. It checks no signature: use receipt verify to know
whether the keybroker signed it.`,
		Example: `  lethectl receipt show m-42.receipt`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			env, err := readReceipt(args[0])
			if err != nil {
				return err
			}
			r, err := env.Decode()
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.ErrOrStderr(), "(signature not verified; use lethectl receipt verify)")
			return writeReceiptJSON(cmd.OutOrStdout(), r)
		},
	}
}

func readReceipt(path string) (*receipt.Envelope, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading receipt: %w", err)
	}
	return receipt.Parse(b)
}

func writeReceiptJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printReceipt prints a receipt's statements for a person.
func printReceipt(w io.Writer, r *receipt.Receipt) {
	fmt.Fprintf(w, "migration   %s (tenant %s, vm %s)\n", r.MigrationID, r.Tenant, r.VM)
	fmt.Fprintf(w, "outcome     %s (epoch %d -> %d)\n", r.Outcome, r.FromEpoch, r.ToEpoch)
	fmt.Fprintf(w, "policy      svn %d, digest %s\n", r.Policy.SVN, r.Policy.Digest)
	for _, end := range []struct {
		name string
		c    receipt.EndClaims
	}{{"source", r.Source}, {"destination", r.Destination}} {
		fmt.Fprintf(w, "%-11s %s evidence %s measurement %s tcb %s\n", end.name, end.c.Platform, end.c.EvidenceDigest, end.c.Measurement, end.c.TCB)
	}
	if len(r.CleanMemory) > 0 {
		fmt.Fprintf(w, "clean memory statement (destination): %s\n", r.CleanMemory)
	}
	if r.Erasure != nil {
		fmt.Fprintf(w, "erasure statement (source evidence %s): %s\n", r.Erasure.EvidenceDigest, r.Erasure.Statement)
		verdict := "accepted by the tenant's policy"
		if !r.Erasure.Accepted {
			verdict = "NOT accepted by the tenant's policy: " + strings.Join(r.Erasure.Reasons, "; ")
		}
		fmt.Fprintf(w, "erasure     %s\n", verdict)
	}
	for _, k := range r.DestroyedKeys {
		fmt.Fprintf(w, "destroyed   %s (last version %d) at %s\n", k.Name, k.LatestVersion, k.DestroyedAt.Format("2006-01-02T15:04:05Z07:00"))
	}
	fmt.Fprintf(w, "ended       %s\nissued      %s\n", r.EndedAt.Format("2006-01-02T15:04:05Z07:00"), r.IssuedAt.Format("2006-01-02T15:04:05Z07:00"))
	for _, c := range r.Caveats {
		fmt.Fprintf(w, "caveat      %s\n", c)
	}
}
