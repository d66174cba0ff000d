package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/policy"
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
	var (
		pubFile, output, policyFile, policyDigest string
		want                                      receiptExpectations
	)
	cmd := &cobra.Command{
		Use:   "verify RECEIPT --pub keybroker.pub",
		Short: "Check a receipt's signature offline, and that it is the receipt you expect",
		Long: `verify checks that RECEIPT is signed by the keybroker key in --pub and is a complete receipt,
then that it states what you expect: the migration, tenant and VM, the signed policy you
applied (--policy, or its digest with --policy-digest), and with --require-erased that the
source's erasure is proven. It prints what the receipt states. It needs no network.

It exits 0 only when the receipt is valid and meets every expectation given. Otherwise it
exits 1 and prints INVALID (the signature or the receipt is bad) or one MISMATCH line per
expectation not met, naming what the receipt says and what was expected. With -o json the
receipt's JSON is printed only when it passes; INVALID and MISMATCH lines go to stderr.

A receipt with outcome committed-unverified-erasure is valid: the migration committed and the
source's keys are destroyed, but the source's erasure is not proven. verify says so under VALID,
with the reasons; --require-erased refuses it.`,
		Example: `  lethectl receipt verify m-42.receipt --pub keybroker.pub
  lethectl receipt verify m-42.receipt --pub keybroker.pub --migration m-42 --tenant demo --vm web \
      --policy policy.signed --require-erased
  lethectl receipt verify m-42.receipt --pub keybroker.pub --policy-digest 3f1c... -o json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			var err error
			if want.policyDigest, err = expectedPolicyDigest(policyFile, policyDigest); err != nil {
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
			// The verdict lines go with the receipt in text; with -o json, stdout holds JSON only.
			out, verdict := cmd.OutOrStdout(), cmd.OutOrStdout()
			if output == "json" {
				verdict = cmd.ErrOrStderr()
			}
			var r *receipt.Receipt
			env, err := readReceipt(args[0])
			if err == nil {
				r, err = receipt.Verify(env, pub)
			}
			if errors.Is(err, receipt.ErrInvalid) {
				fmt.Fprintf(verdict, "INVALID: %v\n", err)
				return &exitError{code: 1}
			}
			if err != nil {
				return err
			}
			if bad := want.mismatches(r); len(bad) > 0 {
				for _, m := range bad {
					fmt.Fprintf(verdict, "MISMATCH: %s\n", m)
				}
				if output == "text" {
					fmt.Fprintf(out, "(signed by keybroker key %s, but not the receipt expected; it states:)\n", receipt.KeyID(pub))
					printReceipt(out, r)
				}
				return &exitError{code: 1}
			}
			if output == "json" {
				if r.Outcome == receipt.OutcomeCommittedUnverifiedErasure {
					fmt.Fprintf(verdict, "WARNING: committed, erasure NOT proven: %s\n", erasureReasons(r))
				}
				return writeReceiptJSON(out, r)
			}
			fmt.Fprintf(out, "VALID: signed by keybroker key %s\n", receipt.KeyID(pub))
			if r.Outcome == receipt.OutcomeCommittedUnverifiedErasure {
				fmt.Fprintf(out, "WARNING: committed, erasure NOT proven: %s\n", erasureReasons(r))
			}
			if checked := want.String(); checked != "" {
				fmt.Fprintf(out, "matches     %s\n", checked)
			}
			printReceipt(out, r)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&pubFile, "pub", "", "the keybroker's receipt-signing public key, PEM (required)")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	f.StringVar(&want.migrationID, "migration", "", "require the receipt to be of this migration ID")
	f.StringVar(&want.tenant, "tenant", "", "require the receipt to be of this tenant")
	f.StringVar(&want.vm, "vm", "", "require the receipt to be of this VM")
	f.StringVar(&policyFile, "policy", "", "require the receipt to name this signed policy (the envelope you applied): the SHA-256 of its payload")
	f.StringVar(&policyDigest, "policy-digest", "", "require the receipt to name the policy of this SHA-256 digest, hex")
	f.BoolVar(&want.requireErased, "require-erased", false, `require the outcome "erased": committed, with the source's erasure proven`)
	_ = cmd.MarkFlagRequired("pub")
	cmd.MarkFlagsMutuallyExclusive("policy", "policy-digest")
	return cmd
}

// receiptExpectations are what receipt verify's flags require of a receipt; a zero field
// requires nothing.
type receiptExpectations struct {
	migrationID, tenant, vm string
	policyDigest            []byte
	requireErased           bool
}

// mismatches returns, one a line, how r differs from what is expected.
func (want *receiptExpectations) mismatches(r *receipt.Receipt) []string {
	var out []string
	for _, f := range []struct{ name, got, want string }{
		{"migration", r.MigrationID, want.migrationID},
		{"tenant", r.Tenant, want.tenant},
		{"vm", r.VM, want.vm},
	} {
		if f.want != "" && f.got != f.want {
			out = append(out, fmt.Sprintf("%s %q in the receipt, expected %q", f.name, f.got, f.want))
		}
	}
	if want.policyDigest != nil && !bytes.Equal(r.Policy.Digest, want.policyDigest) {
		out = append(out, fmt.Sprintf("policy digest %s (policySvn %d) in the receipt, expected %x", r.Policy.Digest, r.Policy.SVN, want.policyDigest))
	}
	if want.requireErased && r.Outcome != receipt.OutcomeErased {
		switch r.Outcome {
		case receipt.OutcomeCommittedUnverifiedErasure:
			out = append(out, fmt.Sprintf("outcome %q (committed, erasure NOT proven: %s), --require-erased expects %q", r.Outcome, erasureReasons(r), receipt.OutcomeErased))
		default:
			out = append(out, fmt.Sprintf("outcome %q in the receipt, --require-erased expects %q", r.Outcome, receipt.OutcomeErased))
		}
	}
	return out
}

// String lists the expectations set, for the line that says they were met.
func (want *receiptExpectations) String() string {
	var s []string
	for _, f := range []struct{ name, v string }{{"migration", want.migrationID}, {"tenant", want.tenant}, {"vm", want.vm}} {
		if f.v != "" {
			s = append(s, f.name+" "+f.v)
		}
	}
	if want.policyDigest != nil {
		s = append(s, fmt.Sprintf("policy digest %x", want.policyDigest))
	}
	if want.requireErased {
		s = append(s, "outcome erased")
	}
	return strings.Join(s, ", ")
}

// expectedPolicyDigest returns the policy digest a receipt must name: the SHA-256 of the
// payload of the signed policy in file (as the keybroker computes it, policy.Policy.Digest),
// or digest decoded from hex; nil when neither is given.
func expectedPolicyDigest(file, digest string) ([]byte, error) {
	switch {
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("reading policy: %w", err)
		}
		env, err := policy.ParseEnvelope(b)
		if err != nil {
			return nil, fmt.Errorf("--policy %s (a signed policy envelope): %w", file, err)
		}
		sum := sha256.Sum256(env.Payload)
		return sum[:], nil
	case digest != "":
		d, err := hex.DecodeString(strings.TrimPrefix(strings.TrimSpace(digest), "sha256:"))
		if err != nil || len(d) != sha256.Size {
			return nil, fmt.Errorf("--policy-digest %q: want %d bytes in hex", digest, sha256.Size)
		}
		return d, nil
	}
	return nil, nil
}

// erasureReasons says why a receipt does not prove the source's erasure.
func erasureReasons(r *receipt.Receipt) string {
	switch {
	case r.Erasure == nil:
		return "the source sent no erasure evidence"
	case len(r.Erasure.Reasons) > 0:
		return "the tenant's policy did not accept the source's erasure evidence: " + strings.Join(r.Erasure.Reasons, "; ")
	case !r.Erasure.Accepted:
		return "the tenant's policy did not accept the source's erasure evidence"
	}
	return "the keybroker did not count the source's accepted erasure evidence as proof"
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
	outcome := string(r.Outcome)
	if r.Outcome == receipt.OutcomeCommittedUnverifiedErasure {
		outcome += ": committed, erasure NOT proven"
	}
	fmt.Fprintf(w, "outcome     %s (epoch %d -> %d)\n", outcome, r.FromEpoch, r.ToEpoch)
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
	} else if r.Outcome == receipt.OutcomeCommittedUnverifiedErasure {
		fmt.Fprintf(w, "erasure     none: the source sent no erasure evidence\n")
	}
	for _, k := range r.DestroyedKeys {
		fmt.Fprintf(w, "destroyed   %s (last version %d) at %s\n", k.Name, k.LatestVersion, k.DestroyedAt.Format("2006-01-02T15:04:05Z07:00"))
	}
	fmt.Fprintf(w, "ended       %s\nissued      %s\n", r.EndedAt.Format("2006-01-02T15:04:05Z07:00"), r.IssuedAt.Format("2006-01-02T15:04:05Z07:00"))
	for _, c := range r.Caveats {
		fmt.Fprintf(w, "caveat      %s\n", c)
	}
}
