package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/policy"
)

func newTenantCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tenant",
		Short: "Register tenants with the keybroker (admin)",
		Long: `Tenant commands are admin calls to the keybroker: they change what it trusts, so they need the
keybroker's admin credential.`,
	}
	cmd.AddCommand(newTenantRegisterCmd())
	return cmd
}

// tenantRegisterOpts are the settings of "lethectl tenant register".
type tenantRegisterOpts struct {
	conn                            brokerOpts
	tenant, pubFile, adminTokenFile string
	replace                         bool
}

func newTenantRegisterCmd() *cobra.Command {
	var o tenantRegisterOpts
	cmd := &cobra.Command{
		Use:   "register --tenant NAME --pub tenant.pub",
		Short: "Register a tenant's policy-signing public key",
		Long: `register records a tenant's Ed25519 policy-signing public key (lethectl keygen writes it) with
the keybroker, which keeps it in Vault beside the keys. From then on the keybroker accepts only
policies signed by that key, with a policySvn not lower than the last it accepted.
Re-registering the same key does nothing; another key needs --replace (the tenant's policySvn is
kept).

The call goes over NATS to the keybroker (lethe.v1.keybroker.tenant.register) with the admin
token read from --admin-token-file (or LETHE_ADMIN_TOKEN), which the keybroker checks against
its own (its --admin-token-file). The token travels inside the request: use a TLS connection to
NATS. The connection settings are the broker commands' (--nats-url, --creds, --user, the
config file).`,
		Example: `  LETHE_ADMIN_TOKEN=... lethectl tenant register --tenant demo --pub ./keys/tenant.pub
  lethectl tenant register --tenant demo --pub ./keys/tenant.pub --admin-token-file admin.token --replace`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return o.run(cmd)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.tenant, "tenant", "", "tenant name: lowercase letters, digits and dashes (required)")
	f.StringVar(&o.pubFile, "pub", "", "the tenant's public key, PEM (required)")
	f.BoolVar(&o.replace, "replace", false, "replace the key of a tenant already registered")
	f.StringVar(&o.adminTokenFile, "admin-token-file", "", "file holding the keybroker's admin token (default: $LETHE_ADMIN_TOKEN)")
	f.StringVar(&o.conn.config, "config", "", "config file (env LETHECTL_CONFIG; default $XDG_CONFIG_HOME/lethe/lethectl.json)")
	f.StringVar(&o.conn.URL, "nats-url", "", "NATS server URL (env LETHE_NATS_URL; default nats://127.0.0.1:4222)")
	f.StringVar(&o.conn.Creds, "creds", "", "NATS credentials file (env LETHE_NATS_CREDS)")
	f.StringVar(&o.conn.User, "user", "", "NATS user (env LETHE_NATS_USER)")
	f.StringVar(&o.conn.Password, "password", "", "NATS password (env LETHE_NATS_PASSWORD)")
	f.DurationVar(&o.conn.Timeout, "timeout", 30*time.Second, "timeout of the keybroker call")
	f.StringVarP(&o.conn.output, "output", "o", "text", "output format: text or json")
	_ = cmd.MarkFlagRequired("tenant")
	_ = cmd.MarkFlagRequired("pub")
	return cmd
}

func (o *tenantRegisterOpts) run(cmd *cobra.Command) error {
	if err := checkPolicyOutput(o.conn.output); err != nil {
		return err
	}
	pub, err := policy.ReadPublicKey(o.pubFile)
	if err != nil {
		return err
	}
	admin, err := o.adminToken()
	if err != nil {
		return err
	}
	if err := o.conn.resolve(); err != nil {
		return err
	}
	opts := []nats.Option{nats.Name("lethectl"), nats.CustomInboxPrefix(broker.InboxPrefix(broker.RoleOperator, ""))}
	if o.conn.Creds != "" {
		opts = append(opts, nats.UserCredentials(o.conn.Creds))
	} else if o.conn.User != "" {
		opts = append(opts, nats.UserInfo(o.conn.User, o.conn.Password))
	}
	nc, err := nats.Connect(o.conn.URL, opts...)
	if err != nil {
		return fmt.Errorf("connecting to %s: %w", o.conn.URL, err)
	}
	defer nc.Close()
	ctx, cancel := o.conn.callCtx(cmd.Context())
	defer cancel()
	resp, err := natsapi.NewClient(nc, o.conn.Timeout).RegisterTenant(ctx, admin, keybroker.RegisterTenantRequest{
		Tenant: o.tenant, PolicyKey: pub, Replace: o.replace,
	})
	if err != nil {
		return fmt.Errorf("registering tenant %s: %w", o.tenant, err)
	}
	return o.conn.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
		fmt.Fprintf(w, "registered tenant %s (key %s, policySvn %d)\n", resp.Tenant, policy.KeyID(pub), resp.PolicySVN)
	})
}

// adminToken reads the admin token from --admin-token-file or LETHE_ADMIN_TOKEN.
func (o *tenantRegisterOpts) adminToken() (string, error) {
	admin := os.Getenv("LETHE_ADMIN_TOKEN")
	if o.adminTokenFile != "" {
		b, err := os.ReadFile(o.adminTokenFile)
		if err != nil {
			return "", fmt.Errorf("reading admin token: %w", err)
		}
		admin = strings.TrimSpace(string(b))
	}
	if admin == "" {
		return "", errors.New("no admin token: set --admin-token-file or LETHE_ADMIN_TOKEN")
	}
	return admin, nil
}
