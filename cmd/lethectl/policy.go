package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/policy"
)

func newPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Lint, sign, verify, test and apply migration policies; show those the broker holds",
		Long: `A migration policy (YAML, apiVersion lethe.dev/v1, kind MigrationPolicy) says where a tenant's
guest may live and move. Write one, lint it, sign it with the tenant's key, and test it against
evidence before registering it with the keybroker.`,
		Example: `  lethectl keygen --out keys
  lethectl policy lint policy.yaml
  lethectl policy sign --key keys/tenant.key policy.yaml --out policy.signed
  lethectl policy verify --pub keys/tenant.pub policy.signed
  lethectl policy test policy.signed --pub keys/tenant.pub --source src.json --destination dst.json --trust-roots roots`,
	}
	cmd.AddCommand(newPolicyLintCmd(), newPolicySignCmd(), newPolicyVerifyCmd(), newPolicyTestCmd(), newPolicyApplyCmd(),
		newPolicyGetCmd(), newPolicyHistoryCmd())
	return cmd
}

// policySummary is what lethectl prints about a valid policy.
type policySummary struct {
	File      string `json:"file"`
	Tenant    string `json:"tenant"`
	Name      string `json:"name"`
	PolicySVN uint64 `json:"policySvn"`
	Digest    string `json:"digest"`
	// Signature is "verified", "not checked" or "none" (a plain YAML file).
	Signature string `json:"signature"`
}

func summarize(file string, p *policy.Policy, signature string) policySummary {
	d := p.Digest()
	return policySummary{
		File: file, Tenant: p.Metadata.Tenant, Name: p.Metadata.Name, PolicySVN: p.Metadata.PolicySVN,
		Digest: "sha256:" + hex.EncodeToString(d[:]), Signature: signature,
	}
}

func (s policySummary) String() string {
	return fmt.Sprintf("policy %s/%s (policySvn %d, %s, signature %s)", s.Tenant, s.Name, s.PolicySVN, s.Digest, s.Signature)
}

// isEnvelope reports whether b looks like a signed policy rather than YAML.
func isEnvelope(b []byte) bool {
	b = bytes.TrimSpace(b)
	return len(b) > 0 && b[0] == '{' && bytes.Contains(b, []byte(`"payloadType"`))
}

// loadPolicy reads a policy file, plain YAML or signed. A signed one is verified with pub
// when pub is given and otherwise only parsed.
func loadPolicy(file, pubFile string) (*policy.Policy, string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, "", fmt.Errorf("reading policy: %w", err)
	}
	if !isEnvelope(b) {
		if pubFile != "" {
			return nil, "", fmt.Errorf("%s is not a signed policy, but --pub asks for a signature", file)
		}
		p, err := policy.Parse(file, b)
		return p, "none", err
	}
	env, err := policy.ParseEnvelope(b)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", file, err)
	}
	if pubFile == "" {
		p, err := policy.Parse(file, env.Payload)
		return p, "not checked", err
	}
	pub, err := policy.ReadPublicKey(pubFile)
	if err != nil {
		return nil, "", err
	}
	p, err := env.Verify(pub)
	return p, "verified", err
}

// printParseErrors prints a policy's positioned errors, one a line, or err itself.
func printParseErrors(w io.Writer, err error) {
	pes := policy.ParseErrors(err)
	if len(pes) == 0 {
		fmt.Fprintln(w, err)
		return
	}
	for _, pe := range pes {
		fmt.Fprintln(w, pe)
	}
}

type lintResult struct {
	File   string               `json:"file"`
	Valid  bool                 `json:"valid"`
	Policy *policySummary       `json:"policy,omitempty"`
	Errors []*policy.ParseError `json:"errors,omitempty"`
	Error  string               `json:"error,omitempty"`
}

func newPolicyLintCmd() *cobra.Command {
	var showDefaults bool
	var output string
	cmd := &cobra.Command{
		Use:   "lint FILE",
		Short: "Check a policy file and print every problem with its position",
		Long: `lint parses a policy (YAML, or a signed policy's payload) strictly and prints every problem as
FILE:LINE:COL: FIELD: what was expected. It exits 1 if there is any. --show-defaults prints the
value every field takes when a policy does not set it.`,
		Example: `  lethectl policy lint examples/policies/snp-production.yaml
  lethectl policy lint --show-defaults
  lethectl policy lint policy.yaml --output json`,
		Args: func(cmd *cobra.Command, args []string) error {
			if showDefaults {
				return cobra.MaximumNArgs(1)(cmd, args)
			}
			return cobra.ExactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if showDefaults {
				if _, err := w.Write(policy.DefaultsYAML); err != nil {
					return err
				}
				if len(args) == 0 {
					return nil
				}
				fmt.Fprintln(w)
			}
			file := args[0]
			p, _, err := loadPolicy(file, "")
			res := lintResult{File: file, Valid: err == nil}
			if err == nil {
				s := summarize(file, p, "not checked")
				res.Policy = &s
			} else {
				res.Errors = policy.ParseErrors(err)
				if len(res.Errors) == 0 {
					res.Error = err.Error()
				}
			}
			if output == "json" {
				if err := json.NewEncoder(w).Encode(res); err != nil {
					return err
				}
			} else if err != nil {
				printParseErrors(cmd.ErrOrStderr(), err)
			} else {
				fmt.Fprintf(w, "%s: ok, %s\n", file, res.Policy)
			}
			if err != nil {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&showDefaults, "show-defaults", false, "print the defaults of every field (FILE optional)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func newPolicySignCmd() *cobra.Command {
	var keyFile, out, output string
	cmd := &cobra.Command{
		Use:   "sign --key tenant.key POLICY.yaml --out POLICY.signed",
		Short: "Sign a policy with the tenant's key",
		Long: `sign lints the policy and wraps its exact bytes in a signed envelope (DSSE, payload type
application/vnd.lethe.policy+yaml, Ed25519). A policy that does not lint is not signed.`,
		Example: `  lethectl policy sign --key keys/tenant.key policy.yaml --out policy.signed`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			key, err := policy.ReadPrivateKey(keyFile)
			if err != nil {
				return err
			}
			file := args[0]
			b, err := os.ReadFile(file)
			if err != nil {
				return fmt.Errorf("reading policy: %w", err)
			}
			env, err := policy.Sign(file, b, key)
			if err != nil {
				if len(policy.ParseErrors(err)) > 0 {
					fmt.Fprintf(cmd.ErrOrStderr(), "not signed: %s does not lint\n", file)
					printParseErrors(cmd.ErrOrStderr(), err)
					return &exitError{code: 1}
				}
				return err
			}
			signed, err := env.Marshal()
			if err != nil {
				return err
			}
			if err := os.WriteFile(out, signed, 0o644); err != nil {
				return fmt.Errorf("writing signed policy: %w", err)
			}
			p, err := policy.Parse(file, b)
			if err != nil {
				return err
			}
			s := summarize(out, p, "by "+env.Signatures[0].KeyID)
			if output == "json" {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(s)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %s\n", out, s)
			return nil
		},
	}
	cmd.Flags().StringVar(&keyFile, "key", "", "the tenant's private key, tenant.key (required)")
	cmd.Flags().StringVar(&out, "out", "", "file to write the signed policy to (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("key")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

func newPolicyVerifyCmd() *cobra.Command {
	var pubFile, output string
	var lastSVN uint64
	cmd := &cobra.Command{
		Use:   "verify --pub tenant.pub POLICY.signed",
		Short: "Check a signed policy's signature and contents",
		Long: `verify checks that the signed policy carries a valid signature by the tenant's key and that its
payload is a valid policy, and prints who it is for, its policySvn and its digest (the digest
receipts name). --last-svn refuses a policySvn lower than the one given, as the keybroker does.`,
		Example: `  lethectl policy verify --pub keys/tenant.pub policy.signed
  lethectl policy verify --pub keys/tenant.pub policy.signed --last-svn 6 --output json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			pub, err := policy.ReadPublicKey(pubFile)
			if err != nil {
				return err
			}
			file := args[0]
			b, err := os.ReadFile(file)
			if err != nil {
				return fmt.Errorf("reading signed policy: %w", err)
			}
			p, err := policy.Verify(b, pub)
			if err == nil {
				err = policy.CheckRollback(p, lastSVN)
			}
			if err != nil {
				if output == "json" {
					_ = json.NewEncoder(cmd.OutOrStdout()).Encode(map[string]any{"file": file, "valid": false, "error": err.Error()})
				} else {
					fmt.Fprintf(cmd.ErrOrStderr(), "%s: invalid: ", file)
					printParseErrors(cmd.ErrOrStderr(), err)
				}
				return &exitError{code: 1}
			}
			s := summarize(file, p, "verified")
			if output == "json" {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(s)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: ok, %s, key %s\n", file, s, policy.KeyID(pub))
			return nil
		},
	}
	cmd.Flags().StringVar(&pubFile, "pub", "", "the tenant's public key, tenant.pub (required)")
	cmd.Flags().Uint64Var(&lastSVN, "last-svn", 0, "refuse a policySvn lower than this")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("pub")
	return cmd
}

type testResult struct {
	Policy   policySummary   `json:"policy"`
	Decision policy.Decision `json:"decision"`
}

func newPolicyTestCmd() *cobra.Command {
	var (
		srcFile, dstFile, rootsDir, pubFile, collateralDir, region, now, output string
		labels                                                                  map[string]string
	)
	cmd := &cobra.Command{
		Use:   "test POLICY --source EVIDENCE --destination EVIDENCE",
		Short: "Verify two pieces of evidence and evaluate a policy on them",
		Long: `test verifies the source's and the destination's evidence (Lethe evidence JSON) and evaluates the
policy on their claims and the destination host's labels and region, as the keybroker would.
It prints allow, or deny with every failing rule, and exits 0 only on allow. Evidence may be
bound to anything: its REPORT_DATA is not checked. POLICY is a YAML file or a signed policy
(whose signature is checked when --pub is given).`,
		Example: `  lethectl attest emulate --platform emulated-sev-snp --report-data 00 --out src.json --roots-out roots
  lethectl attest emulate --platform emulated-sev-snp --report-data 00 --out dst.json --roots-out roots
  lethectl policy test examples/policies/ci-emulated.yaml --source src.json --destination dst.json \
      --trust-roots roots --host-labels zone=a,pool=web --region eu-west-1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkPolicyOutput(output); err != nil {
				return err
			}
			file := args[0]
			p, sig, err := loadPolicy(file, pubFile)
			if err != nil {
				printParseErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: 1}
			}
			cfg := attest.Config{CollateralDir: collateralDir}
			if rootsDir != "" {
				if cfg.Roots, err = attest.LoadRoots(rootsDir); err != nil {
					return err
				}
			}
			if now != "" {
				t, err := time.Parse(time.RFC3339, now)
				if err != nil {
					return fmt.Errorf("--now: %w", err)
				}
				cfg.Now = func() time.Time { return t }
			}
			v, err := attest.NewVerifier(cfg)
			if err != nil {
				return err
			}
			host := policy.HostInfo{Labels: labels, Region: region}
			res := testResult{Policy: summarize(file, p, sig), Decision: evaluateEvidence(cmd.Context(), v, p, srcFile, dstFile, host)}
			w := cmd.OutOrStdout()
			if output == "json" {
				if err := json.NewEncoder(w).Encode(res); err != nil {
					return err
				}
			} else {
				printDecision(w, res)
			}
			if !res.Decision.Allow {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&srcFile, "source", "", "the source host's evidence (required)")
	f.StringVar(&dstFile, "destination", "", "the destination host's evidence (required)")
	f.StringToStringVar(&labels, "host-labels", nil, "the destination host's labels, k=v,k2=v2")
	f.StringVar(&region, "region", "", "the destination host's region")
	f.StringVar(&rootsDir, "trust-roots", "", "directory of extra roots of trust, such as an emulator's (attest emulate --roots-out)")
	f.StringVar(&pubFile, "pub", "", "the tenant's public key: check the signed policy's signature")
	f.StringVar(&collateralDir, "collateral", "", "offline collateral cache directory")
	f.StringVar(&now, "now", "", "verify certificates at this time (RFC 3339) instead of now")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("source")
	_ = cmd.MarkFlagRequired("destination")
	return cmd
}

// evaluateEvidence verifies both pieces of evidence and evaluates p. Evidence that does not
// verify is a denial that says why.
func evaluateEvidence(ctx context.Context, v *attest.Verifier, p *policy.Policy, srcFile, dstFile string, host policy.HostInfo) policy.Decision {
	var reasons []policy.Reason
	verify := func(end, file string) *attest.Claims {
		c, err := verifyEvidenceFile(ctx, v, file)
		if err != nil {
			reasons = append(reasons, policy.Reason{Rule: end + ".evidence", Message: fmt.Sprintf("%s evidence %s: %v", end, file, err)})
		}
		return c
	}
	src := verify("source", srcFile)
	dst := verify("destination", dstFile)
	if len(reasons) > 0 {
		return policy.Decision{Reasons: reasons}
	}
	return policy.Evaluate(p, src, dst, host)
}

func verifyEvidenceFile(ctx context.Context, v *attest.Verifier, file string) (*attest.Claims, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading evidence: %w", err)
	}
	ev, err := attest.ParseEvidence(b)
	if err != nil {
		return nil, err
	}
	c, err := v.Verify(ctx, ev, attest.Expectation{SkipReportData: true})
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, errors.New("verifier returned no claims")
	}
	return c, nil
}

func printDecision(w io.Writer, res testResult) {
	if res.Decision.Allow {
		fmt.Fprintf(w, "allow: %s\n", res.Policy)
		return
	}
	fmt.Fprintf(w, "deny: %s\n", res.Policy)
	for _, r := range res.Decision.Reasons {
		fmt.Fprintf(w, "  - %s: %s\n", r.Rule, r.Message)
	}
}
