package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/tlog"
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
	cmd.AddCommand(newReceiptVerifyCmd(), newReceiptShowCmd(), newReceiptGetCmd(), newReceiptExportCmd())
	return cmd
}

func newReceiptVerifyCmd() *cobra.Command {
	var (
		pubFile, output, policyFile, policyDigest string
		logProof, logOrigin                       string
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
with the reasons; --require-erased refuses it.

With a log proof (--log-proof, or RECEIPT.log.json when it exists, as receipt get writes it)
verify also checks that the migration's ending is in the keybroker's residency log: the
checkpoint is signed by the same key (--pub) under the log's name (the checkpoint's origin,
or --log-origin), the inclusion proof leads from the entry to the checkpoint's root, and the
entry is the commit or abort of this receipt's migration naming this receipt. It prints the
entry's index and the checkpoint's size; a proof that fails any check prints INVALID LOG
PROOF and what failed. --require-logged refuses a receipt without a proof.`,
		Example: `  lethectl receipt verify m-42.receipt --pub keybroker.pub
  lethectl receipt verify m-42.receipt --pub keybroker.pub --migration m-42 --tenant demo --vm web \
      --policy policy.signed --require-erased
  lethectl receipt verify m-42.receipt --pub keybroker.pub --policy-digest 3f1c... -o json
  lethectl receipt verify m-42.receipt --pub keybroker.pub --log-proof m-42.log.json --require-logged`,
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
			bad := want.mismatches(r)
			logFile, err := logProofFile(args[0], logProof)
			if err != nil {
				return err
			}
			if logFile == "" && want.requireLogged {
				bad = append(bad, fmt.Sprintf("no log proof (--log-proof, or %s), --require-logged expects one", args[0]+logProofSuffix))
			}
			if len(bad) > 0 {
				for _, m := range bad {
					fmt.Fprintf(verdict, "MISMATCH: %s\n", m)
				}
				if output == "text" {
					fmt.Fprintf(out, "(signed by keybroker key %s, but not the receipt expected; it states:)\n", receipt.KeyID(pub))
					printReceipt(out, r)
				}
				return &exitError{code: 1}
			}
			var logged *loggedEnding
			if logFile != "" {
				b, err := os.ReadFile(logFile)
				if err != nil {
					return fmt.Errorf("reading log proof: %w", err)
				}
				if logged, err = verifyLogProof(b, pub, logOrigin, r.MigrationID, env.Payload); err != nil {
					fmt.Fprintf(verdict, "INVALID LOG PROOF: %s: %v\n", logFile, err)
					return &exitError{code: 1}
				}
			}
			if output == "json" {
				if r.Outcome == receipt.OutcomeCommittedUnverifiedErasure {
					fmt.Fprintf(verdict, "WARNING: committed, erasure NOT proven: %s\n", erasureReasons(r))
				}
				if logged != nil {
					fmt.Fprintf(verdict, "LOGGED: %s\n", logged)
				}
				return writeReceiptJSON(out, r)
			}
			fmt.Fprintf(out, "VALID: signed by keybroker key %s\n", receipt.KeyID(pub))
			if logged != nil {
				fmt.Fprintf(out, "LOGGED: %s\n", logged)
			} else {
				fmt.Fprintf(out, "NOT CHECKED: no log proof given: nothing here shows the ending is in the residency log (--log-proof)\n")
			}
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
	f.StringVar(&logProof, "log-proof", "", "the residency log's proof that the receipt's ending is logged, JSON (default: RECEIPT.log.json, when it exists)")
	f.StringVar(&logOrigin, "log-origin", "", "require the log proof's checkpoint to be of the log of this name (default: the name it states)")
	f.BoolVar(&want.requireLogged, "require-logged", false, "require a log proof: refuse a receipt whose ending is not proven to be in the residency log")
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
	requireLogged           bool
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
	if want.requireLogged {
		s = append(s, "logged")
	}
	return strings.Join(s, ", ")
}

// logProofFile returns the log proof to check for the receipt in receiptFile: flag when
// given, else the receipt's sidecar (receiptFile+logProofSuffix) when it exists, else "".
func logProofFile(receiptFile, flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	sidecar := receiptFile + logProofSuffix
	switch _, err := os.Stat(sidecar); {
	case err == nil:
		return sidecar, nil
	case errors.Is(err, fs.ErrNotExist):
		return "", nil
	default:
		return "", fmt.Errorf("looking for the log proof: %w", err)
	}
}

// maxLogProof bounds a log proof file: a checkpoint, an entry and 64 hashes take a few KiB.
const maxLogProof = 1 << 20

// loggedEnding is what a log proof that verified established.
type loggedEnding struct {
	origin      string
	index, size uint64
	kind        tlog.Kind
	witnesses   []string
}

func (l *loggedEnding) String() string {
	s := fmt.Sprintf("the %s is entry %d of the residency log %s (checkpoint of size %d, signed by the same key)", l.kind, l.index, l.origin, l.size)
	if len(l.witnesses) > 0 {
		s += ", cosigned by " + strings.Join(l.witnesses, ", ")
	}
	return s
}

// verifyLogProof checks a log proof (a tlog.Inclusion, JSON) of the receipt of migrationID
// whose signed payload is payload: its checkpoint is signed by pub as the log origin (the
// origin it states when origin is empty), and its entry is included in it and is the ending
// of that migration naming that receipt. Its errors name the check that failed.
func verifyLogProof(b []byte, pub ed25519.PublicKey, origin, migrationID string, payload []byte) (*loggedEnding, error) {
	if len(b) > maxLogProof {
		return nil, fmt.Errorf("decoding the proof: %d bytes, at most %d", len(b), maxLogProof)
	}
	var inc tlog.Inclusion
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&inc); err != nil {
		return nil, fmt.Errorf("decoding the proof: %w", err)
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, errors.New("decoding the proof: data after it")
	}
	if origin == "" {
		line, _, _ := bytes.Cut(inc.Checkpoint, []byte("\n"))
		origin = string(line)
	}
	v, err := tlog.LogVerifier(origin, pub)
	if err != nil {
		return nil, fmt.Errorf("checking the checkpoint's signature: log name %q: %w", origin, err)
	}
	cp, err := tlog.Open(inc.Checkpoint, v, nil, 0)
	if err != nil {
		return nil, fmt.Errorf("checking the checkpoint's signature by the keybroker key %s as log %q: %w", receipt.KeyID(pub), origin, err)
	}
	e, err := tlog.VerifyReceipt(cp, &inc, migrationID, payload)
	if err != nil {
		return nil, fmt.Errorf("checking that the log's checkpoint of size %d holds this receipt's ending: %w", cp.Size, err)
	}
	return &loggedEnding{origin: cp.Origin, index: inc.Entry.Index, size: cp.Size, kind: e.Kind, witnesses: cp.Witnesses}, nil
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
