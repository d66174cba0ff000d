package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/policy"
)

// appliedPolicy is what "lethectl policy apply" prints: the keybroker's floor after the
// publication (nil when not published) and where the broker stored the policy.
type appliedPolicy struct {
	Published *kbwire.PublishPolicyResponse `json:"published,omitempty"`
	Applied   *broker.ApplyPolicyResponse   `json:"applied"`
}

// newPolicyApplyCmd is "lethectl policy apply SIGNED": it publishes a signed policy envelope to
// the keybroker (which raises the floor of the policy's name to its policySvn), then stores it
// with the broker, which keeps it as signed (the keybroker verifies it at each release).
func newPolicyApplyCmd() *cobra.Command {
	var o brokerOpts
	var vmName, forTenant string
	var noPublish bool
	cmd := &cobra.Command{
		Use:   "apply SIGNED",
		Short: "Publish a signed policy to the keybroker and store it with the broker (tenant-wide, or for one VM with --vm)",
		Long: `apply does two things. As the tenant, it first publishes the signed policy to the keybroker
(lethe.v1.keybroker.policy.publish): the keybroker verifies the tenant's signature and raises the
floor of the policy's (tenant, metadata.name) to its policySvn, so that no older policy of that
name is accepted again, whatever the broker keeps. Then it stores the policy with the broker.

An operator applying a tenant's policy (--for) does not publish: the floor moves only when the
tenant publishes. The keybroker accepts the policy only for the guests its spec.guests names.

A policy of another tenant than the one you act as (or than --for) is refused before
anything is sent, naming the policy's tenant, and an unsigned policy file is answered with
how to sign it. The keybroker refuses, at publication, a signature by
another key than the tenant's and a policySvn below the floor of its name.`,
		Example: "  lethectl policy apply policy.signed.json --tenant acme\n  lethectl policy apply web.signed.json --vm web\n  lethectl policy apply acme.signed.json --for acme   # an operator: no publication",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			envelope, err := os.ReadFile(args[0])
			if err != nil {
				return fmt.Errorf("reading signed policy: %w", err)
			}
			tenant, err := signedPolicyTenant(args[0], envelope)
			if err != nil {
				return err
			}
			if err := o.resolve(); err != nil {
				return err
			}
			switch {
			case forTenant != "" && forTenant != tenant:
				return fmt.Errorf("%s is tenant %s's policy, not %s's (--for)", args[0], tenant, forTenant)
			case forTenant == "" && o.Tenant != "" && o.Tenant != tenant:
				return fmt.Errorf("%s is tenant %s's policy; you act as tenant %s: apply it as %s", args[0], tenant, o.Tenant, tenant)
			case forTenant == "" && o.Tenant == "":
				return fmt.Errorf("%s is tenant %s's policy: apply it as that tenant (--tenant %s), or as an operator for it (--for %s, which does not publish it)", args[0], tenant, tenant, tenant)
			}
			var out appliedPolicy
			if forTenant == "" && o.Tenant != "" && !noPublish {
				if out.Published, err = publishPolicy(cmd.Context(), &o, envelope); err != nil {
					return err
				}
			}
			out.Applied, err = callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ApplyPolicyResponse, error) {
				return c.ApplyPolicy(ctx, &broker.ApplyPolicyRequest{Tenant: forTenant, VM: vmName, Envelope: envelope})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), &out, func(w io.Writer) {
				if p := out.Published; p != nil {
					fmt.Fprintf(w, "published %s/%s to the keybroker (floor policySvn %d)\n", p.Tenant, p.Name, p.Floor)
				}
				fmt.Fprintf(w, "applied %s (revision %d)\n", out.Applied.Key, out.Applied.Revision)
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&vmName, "vm", "", "scope the policy to one VM")
	cmd.Flags().StringVar(&forTenant, "for", "", "operators: the tenant whose signed policy this is (not published)")
	cmd.Flags().BoolVar(&noPublish, "no-publish", false, "store with the broker only; the keybroker's floor does not move")
	return cmd
}

// signedPolicyTenant returns the tenant a signed policy names (its signature is the
// keybroker's to check), or says how to sign a policy given unsigned.
func signedPolicyTenant(file string, b []byte) (string, error) {
	env, err := policy.ParseEnvelope(b)
	if err != nil {
		if _, perr := policy.Parse(file, b); perr == nil {
			return "", fmt.Errorf("%s is a policy that is not signed: sign it first (lethectl policy sign --key TENANT.key %s --out %s.signed) and apply the signed file", file, file, file)
		}
		return "", fmt.Errorf("reading signed policy %s: %w", file, err)
	}
	p, err := policy.Parse(file, env.Payload)
	if err != nil {
		return "", fmt.Errorf("reading signed policy %s: %w", file, err)
	}
	return p.Metadata.Tenant, nil
}

// publishPolicy publishes envelope to the keybroker as o's tenant.
func publishPolicy(ctx context.Context, o *brokerOpts, envelope []byte) (*kbwire.PublishPolicyResponse, error) {
	nc, err := dialNATS(o, natsauth.RoleTenant, o.Tenant)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	ctx, cancel := o.callCtx(ctx)
	defer cancel()
	resp, err := kbclient.New(nc, o.Timeout).PublishPolicy(ctx, envelope)
	if err != nil {
		return nil, fmt.Errorf("publishing the policy to the keybroker: %w", err)
	}
	return resp, nil
}
