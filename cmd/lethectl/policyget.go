package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/policy"
)

// heldPolicy is a policy revision the broker holds, with what its envelope says. The
// broker stores envelopes as signed; lethectl reads them but proves nothing (the keybroker
// verifies the signature at each release; lethectl policy verify does with the tenant's key).
type heldPolicy struct {
	broker.PolicyView
	Name      string `json:"name,omitempty"`
	PolicySVN uint64 `json:"policySvn,omitempty"`
	// Digest is the SHA-256 of the policy's YAML, as policy lint and sign print it.
	Digest string `json:"digest,omitempty"`
	// KeyIDs name the keys that signed the envelope, as the envelope says.
	KeyIDs []string `json:"keyIds,omitempty"`
	// YAML is the policy as signed.
	YAML string `json:"yaml,omitempty"`
	// Unreadable says why the envelope could not be read.
	Unreadable string `json:"unreadable,omitempty"`
}

// needTenant refuses an operator's command that names no tenant with --for.
func needTenant(o *brokerOpts, forTenant, command string) error {
	if err := o.resolve(); err != nil {
		return err
	}
	if o.Tenant == "" && forTenant == "" {
		return fmt.Errorf("%s: as an operator, name the tenant with --for TENANT (or act as it with --tenant)", command)
	}
	return nil
}

func readHeldPolicy(v broker.PolicyView) heldPolicy {
	h := heldPolicy{PolicyView: v}
	env, err := policy.ParseEnvelope(v.Envelope)
	if err != nil {
		h.Unreadable = err.Error()
		return h
	}
	for _, s := range env.Signatures {
		h.KeyIDs = append(h.KeyIDs, s.KeyID)
	}
	d := sha256.Sum256(env.Payload)
	h.Digest, h.YAML = "sha256:"+hex.EncodeToString(d[:]), string(env.Payload)
	p, err := policy.Parse("stored policy", env.Payload)
	if err != nil {
		h.Unreadable = err.Error()
		return h
	}
	h.Name, h.PolicySVN = p.Metadata.Name, p.Metadata.PolicySVN
	return h
}

// policyOutput takes -o yaml out of o (whose outputs are text and json) and says whether it
// was asked for.
func policyOutput(o *brokerOpts) bool {
	if o.output == "yaml" {
		o.output = "text"
		return true
	}
	return false
}

func newPolicyGetCmd() *cobra.Command {
	var o brokerOpts
	var vmName, forTenant string
	cmd := &cobra.Command{
		Use:   "get [--vm VM]",
		Short: "Show the policy the broker holds for the tenant, or the one that applies to a VM",
		Long: `get shows the signed policy the broker holds: the tenant-wide one, or with --vm the one
migrations of that VM use (its own, else the tenant-wide one): its name, policySvn, the digest
of its YAML, the key that signed it and when it was applied. -o yaml prints the policy's YAML
as signed; -o json all of it, the envelope too. Operators name the tenant with --for.`,
		Example: "  lethectl policy get --tenant acme\n  lethectl policy get --vm web -o yaml\n  lethectl policy get --for acme   # an operator",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asYAML := policyOutput(&o)
			if err := needTenant(&o, forTenant, "policy get"); err != nil {
				return err
			}
			v, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.PolicyView, error) {
				return c.GetPolicy(ctx, &broker.GetPolicyRequest{Tenant: forTenant, VM: vmName})
			})
			if err != nil {
				return err
			}
			h := readHeldPolicy(*v)
			if asYAML {
				if h.YAML == "" {
					return fmt.Errorf("policy %s: %s", h.Key, h.Unreadable)
				}
				_, err := io.WriteString(cmd.OutOrStdout(), h.YAML)
				return err
			}
			return o.show(cmd.OutOrStdout(), h, func(w io.Writer) { printHeldPolicy(w, &h) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().Lookup("output").Usage = "output format: text, yaml or json"
	cmd.Flags().StringVar(&vmName, "vm", "", "the policy that applies to this VM")
	cmd.Flags().StringVar(&forTenant, "for", "", "operators: the tenant whose policy to show")
	return cmd
}

func printHeldPolicy(w io.Writer, h *heldPolicy) {
	scope := "tenant-wide"
	if h.VM != "" {
		scope = "VM " + h.VM
	}
	fmt.Fprintf(w, "Key:       %s (%s of tenant %s)\n", h.Key, scope, h.Tenant)
	if h.Unreadable != "" {
		fmt.Fprintf(w, "Envelope:  unreadable: %s\n", h.Unreadable)
	} else {
		fmt.Fprintf(w, "Policy:    %s (policySvn %d)\nDigest:    %s\nSigned by: %s\n", h.Name, h.PolicySVN, h.Digest, strings.Join(h.KeyIDs, ", "))
	}
	fmt.Fprintf(w, "Revision:  %d, applied %s\n", h.Revision, h.Applied.Format(time.RFC3339))
}

func newPolicyHistoryCmd() *cobra.Command {
	var o brokerOpts
	var vmName, forTenant string
	cmd := &cobra.Command{
		Use:   "history [--vm VM]",
		Short: "List the revisions the broker keeps of the tenant's policy (the last 5)",
		Long: `history lists, oldest first, the revisions the broker keeps of the tenant-wide policy, or
with --vm of that VM's own policy: the last 5 applied, each with its name, policySvn, digest and
when it was applied. Operators name the tenant with --for.`,
		Example: "  lethectl policy history --tenant acme\n  lethectl policy history --for acme --vm web -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := needTenant(&o, forTenant, "policy history"); err != nil {
				return err
			}
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.PolicyHistoryResponse, error) {
				return c.PolicyHistory(ctx, &broker.PolicyHistoryRequest{Tenant: forTenant, VM: vmName})
			})
			if err != nil {
				return err
			}
			held := []heldPolicy{}
			for _, v := range resp.Revisions {
				held = append(held, readHeldPolicy(v))
			}
			return o.show(cmd.OutOrStdout(), held, func(w io.Writer) {
				table(w, "REVISION\tNAME\tPOLICYSVN\tDIGEST\tAPPLIED", func(tw io.Writer) {
					for _, h := range held {
						name, svn, digest := h.Name, fmt.Sprint(h.PolicySVN), h.Digest
						if h.Unreadable != "" {
							name, svn, digest = "(unreadable)", "-", "-"
						}
						fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\n", h.Revision, name, svn, digest, h.Applied.Format(time.RFC3339))
					}
				})
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&vmName, "vm", "", "the VM's own policy rather than the tenant-wide one")
	cmd.Flags().StringVar(&forTenant, "for", "", "operators: the tenant whose policy to list")
	return cmd
}
