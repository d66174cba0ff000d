package main

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/policy"
)

func newTenantCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tenant",
		Short: "Register tenants with the keybroker (admin) and rotate their keys (tenant)",
		Long: `register is an admin call to the keybroker, signed with the operator's admin key (the keybroker
pins its public half, --admin-pub). rotate-key is the tenant's: only a statement signed by the
tenant's current key (or its recovery key) changes the tenant's key.`,
	}
	cmd.AddCommand(newTenantRegisterCmd(), newTenantRotateKeyCmd())
	return cmd
}

// addKeybrokerConnFlags adds the NATS connection flags of the keybroker commands.
func addKeybrokerConnFlags(cmd *cobra.Command, o *brokerOpts) {
	f := cmd.Flags()
	addNATSFlags(f, o)
	f.DurationVar(&o.Timeout, "timeout", 30*time.Second, "timeout of the keybroker call")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
}

// dialNATS connects as o says, with the inbox of role and name.
func dialNATS(o *brokerOpts, role broker.Role, name string) (*nats.Conn, error) {
	opts := []nats.Option{nats.Name("lethectl"), nats.CustomInboxPrefix(broker.InboxPrefix(role, name))}
	if o.Creds != "" {
		opts = append(opts, nats.UserCredentials(o.Creds))
	} else if o.User != "" {
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", o.URL, err)
	}
	return nc, nil
}

// tenantRegisterOpts are the settings of "lethectl tenant register".
type tenantRegisterOpts struct {
	conn                                 brokerOpts
	tenant, pubFile, recoveryPub, keyOpt string
	validity                             time.Duration
}

func newTenantRegisterCmd() *cobra.Command {
	var o tenantRegisterOpts
	cmd := &cobra.Command{
		Use:   "register --tenant NAME --pub tenant.pub --admin-key admin.key",
		Short: "Register a tenant's policy-signing public key (admin)",
		Long: `register records a tenant's Ed25519 policy-signing public key (lethectl keygen writes it), and
optionally a recovery key (--recovery-pub), with the keybroker, which keeps them in Vault beside
the keys. From then on the keybroker accepts only policies signed by that key, each for the
guests its spec.guests names, and never below the floor the tenant published for its name.

The request is a statement signed with the operator's admin key (--admin-key, or the file
$LETHE_ADMIN_KEY; lethectl keygen --name admin makes one), valid for --validity (at most 5m)
and accepted once: no secret crosses NATS. Registering the same keys again does nothing; the
admin can never change a registered tenant's key (the tenant does: lethectl tenant rotate-key).
The call goes over NATS to lethe.v1.keybroker.tenant.register, as an operator.`,
		Example: `  lethectl keygen --name admin --out ./admin
  lethectl tenant register --tenant demo --pub ./keys/tenant.pub --admin-key ./admin/admin.key
  lethectl tenant register --tenant acme --pub acme.pub --recovery-pub acme-recovery.pub --admin-key admin.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return o.run(cmd)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.tenant, "tenant", "", "tenant name: lowercase letters, digits and dashes (required)")
	f.StringVar(&o.pubFile, "pub", "", "the tenant's public key, PEM (required)")
	f.StringVar(&o.recoveryPub, "recovery-pub", "", "the tenant's recovery public key, PEM (optional; kept offline by the tenant)")
	f.StringVar(&o.keyOpt, "admin-key", "", "the operator's admin private key, PEM (default: the file $LETHE_ADMIN_KEY)")
	f.DurationVar(&o.validity, "validity", time.Minute, "how long the signed request stays valid (at most 5m)")
	addKeybrokerConnFlags(cmd, &o.conn)
	_ = cmd.MarkFlagRequired("tenant")
	_ = cmd.MarkFlagRequired("pub")
	return cmd
}

func (o *tenantRegisterOpts) run(cmd *cobra.Command) error {
	if err := checkPolicyOutput(o.conn.output); err != nil {
		return err
	}
	req := kbwire.RegisterTenantRequest{Tenant: o.tenant}
	var err error
	if req.PolicyKey, err = policy.ReadPublicKey(o.pubFile); err != nil {
		return err
	}
	if o.recoveryPub != "" {
		if req.RecoveryKey, err = policy.ReadPublicKey(o.recoveryPub); err != nil {
			return err
		}
	}
	path := o.keyOpt
	if path == "" {
		path = os.Getenv("LETHE_ADMIN_KEY")
	}
	if path == "" {
		return errors.New("no admin key: set --admin-key or LETHE_ADMIN_KEY")
	}
	admin, err := policy.ReadPrivateKey(path)
	if err != nil {
		return fmt.Errorf("reading admin key: %w", err)
	}
	signed, err := kbwire.SignAdmin(kbwire.OpTenantRegister, req, time.Now(), o.validity, admin)
	if err != nil {
		return err
	}
	if err := o.conn.resolve(); err != nil {
		return err
	}
	nc, err := dialNATS(&o.conn, broker.RoleOperator, "")
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := o.conn.callCtx(cmd.Context())
	defer cancel()
	resp, err := natsapi.NewClient(nc, o.conn.Timeout).RegisterTenant(ctx, signed)
	if err != nil {
		return fmt.Errorf("registering tenant %s: %w", o.tenant, err)
	}
	return o.conn.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
		rec := ""
		if resp.Recovery {
			rec = ", with a recovery key"
		}
		fmt.Fprintf(w, "registered tenant %s (key %s%s)\n", resp.Tenant, resp.KeyID, rec)
	})
}

// tenantRotateOpts are the settings of "lethectl tenant rotate-key".
type tenantRotateOpts struct {
	conn                                     brokerOpts
	tenant, keyFile, recoveryKey, currentPub string
	newPub, newRecoveryPub                   string
}

func newTenantRotateKeyCmd() *cobra.Command {
	var o tenantRotateOpts
	cmd := &cobra.Command{
		Use:   "rotate-key --tenant NAME --key tenant.key --new-pub new.pub",
		Short: "Replace the tenant's policy key by a statement signed with the current key (or the recovery key)",
		Long: `rotate-key replaces the tenant's policy-signing key: it signs a rotation statement naming the
current key and the new one, with the current private key (--key), and sends it to the keybroker
(lethe.v1.keybroker.tenant.rotate-key), which accepts it only if the current key signed it. From
then on only policies signed by the new key are accepted; publish and apply them again. A key
that was the tenant's never comes back.

If the current key is lost, sign with the recovery key registered at enrolment instead
(--recovery-key, with --current-pub naming the lost key); the keybroker audits it as a recovery.
Only a recovery-key statement may replace the recovery key (--new-recovery-pub); the current key
may only add one where there is none.`,
		Example: `  lethectl keygen --out ./keys-2
  lethectl tenant rotate-key --tenant demo --key ./keys/tenant.key --new-pub ./keys-2/tenant.pub
  lethectl tenant rotate-key --tenant demo --recovery-key ./recovery/recovery.key --current-pub ./keys/tenant.pub --new-pub ./keys-2/tenant.pub`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return o.run(cmd)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.tenant, "tenant", "", "tenant name (required; env LETHE_TENANT)")
	f.StringVar(&o.keyFile, "key", "", "the current policy private key, PEM (signs the statement)")
	f.StringVar(&o.recoveryKey, "recovery-key", "", "the recovery private key, PEM (signs instead of a lost --key)")
	f.StringVar(&o.currentPub, "current-pub", "", "the current policy public key, PEM (required with --recovery-key)")
	f.StringVar(&o.newPub, "new-pub", "", "the new policy public key, PEM (required)")
	f.StringVar(&o.newRecoveryPub, "new-recovery-pub", "", "a new recovery public key, PEM (optional)")
	addKeybrokerConnFlags(cmd, &o.conn)
	_ = cmd.MarkFlagRequired("new-pub")
	return cmd
}

func (o *tenantRotateOpts) run(cmd *cobra.Command) error {
	if err := checkPolicyOutput(o.conn.output); err != nil {
		return err
	}
	if err := o.conn.resolve(); err != nil {
		return err
	}
	if o.tenant == "" {
		o.tenant = o.conn.Tenant
	}
	if o.tenant == "" {
		return errors.New("no tenant: set --tenant or LETHE_TENANT")
	}
	var signer ed25519.PrivateKey
	var current ed25519.PublicKey
	var err error
	switch {
	case o.keyFile != "" && o.recoveryKey != "":
		return errors.New("--key and --recovery-key exclude each other")
	case o.keyFile != "":
		if signer, err = policy.ReadPrivateKey(o.keyFile); err != nil {
			return err
		}
		current = signer.Public().(ed25519.PublicKey)
	case o.recoveryKey != "":
		if o.currentPub == "" {
			return errors.New("--recovery-key needs --current-pub, the key it replaces")
		}
		if signer, err = policy.ReadPrivateKey(o.recoveryKey); err != nil {
			return err
		}
		if current, err = policy.ReadPublicKey(o.currentPub); err != nil {
			return err
		}
	default:
		return errors.New("no signing key: set --key (or --recovery-key)")
	}
	r := &kbwire.KeyRotation{Tenant: o.tenant, CurrentKeyID: policy.KeyID(current), IssuedAt: time.Now().UTC()}
	if r.NewKey, err = policy.ReadPublicKey(o.newPub); err != nil {
		return err
	}
	if o.newRecoveryPub != "" {
		if r.NewRecoveryKey, err = policy.ReadPublicKey(o.newRecoveryPub); err != nil {
			return err
		}
	}
	signed, err := kbwire.SignRotation(r, signer)
	if err != nil {
		return err
	}
	nc, err := dialNATS(&o.conn, broker.RoleTenant, o.tenant)
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := o.conn.callCtx(cmd.Context())
	defer cancel()
	resp, err := natsapi.NewClient(nc, o.conn.Timeout).RotateKey(ctx, signed)
	if err != nil {
		return fmt.Errorf("rotating the key of tenant %s: %w", o.tenant, err)
	}
	return o.conn.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
		by := "the current key"
		if resp.Recovery {
			by = "the recovery key"
		}
		fmt.Fprintf(w, "tenant %s now signs with key %s (rotation signed by %s)\n", resp.Tenant, resp.KeyID, by)
	})
}
