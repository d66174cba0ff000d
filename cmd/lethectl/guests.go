package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/policy"
)

func newGuestsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "guests", Short: "Adopt, list and forget guests; audit a guest's residency history"}
	cmd.AddCommand(newGuestsListCmd(), newGuestsAdoptCmd(), newGuestsForgetCmd(), newGuestsHistoryCmd())
	return cmd
}

func newGuestsListCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List adopted guests: host, epoch, migration in progress",
		Example: "  lethectl guests list --tenant acme",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ListGuestsResponse, error) {
				return c.ListGuests(ctx, &broker.ListGuestsRequest{})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
				table(w, "TENANT\tVM\tHOST\tPLATFORM\tEPOCH\tMIGRATION", func(tw io.Writer) {
					for _, g := range resp.Guests {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", g.Tenant, g.VM, g.Host, g.Platform, g.Epoch, g.Migration)
					}
				})
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

func newGuestsAdoptCmd() *cobra.Command {
	var o brokerOpts
	var host, forTenant string
	cmd := &cobra.Command{
		Use:   "adopt GUEST --host HOST",
		Short: "Take a guest in on its current host (its first residency, epoch 1)",
		Long: `Adopt a guest: the agent of HOST attests, and if the tenant's signed policy accepts
that host the keybroker creates the guest's first memory key and seals it to the agent.

Adopting a guest again on the host where it already lives (with no migration in progress)
reissues its current memory key to that host's agent, after the agent attests afresh: this
is how an agent that restarted gets the key back. On any other host it is refused.`,
		Example: "  lethectl guests adopt web --host h1 --tenant acme",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if host == "" {
				return fmt.Errorf("--host is required")
			}
			g, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Guest, error) {
				return c.AdoptGuest(ctx, &broker.AdoptGuestRequest{Tenant: forTenant, VM: args[0], Host: host})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), g, func(w io.Writer) {
				fmt.Fprintf(w, "adopted %s/%s on %s (epoch %d)\n", g.Tenant, g.VM, g.Host, g.Epoch)
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&host, "host", "", "the host the guest runs on")
	cmd.Flags().StringVar(&forTenant, "for", "", "operators: the tenant that owns the guest")
	return cmd
}

func newGuestsForgetCmd() *cobra.Command {
	var o brokerOpts
	var forTenant, reason, keyFile, adminKeyFile string
	var validity time.Duration
	var yes bool
	cmd := &cobra.Command{
		Use:   "forget GUEST (--key tenant.key | --admin-key admin.key) [--reason R] [--yes]",
		Short: "Forget a guest whose VM is gone for good: its memory key is destroyed",
		Long: `Forget a guest whose VM is gone for good (deleted, or its host decommissioned): the
keybroker destroys its memory key in Vault and logs a forget entry in the residency log, and
the broker drops its record, so that it is no longer listed, migrated nor counted in fleet
operations, and a guest of that name can be adopted again (from epoch 1). It cannot be undone:
whatever of the guest's memory was kept anywhere can never be decrypted again.

The broker is not trusted with the guest's key, so the forget is a statement signed here and
passed through it to the keybroker: with the tenant's policy key (--key tenant.key, as
lethectl policy sign), or, for an operator, with the admin key (--admin-key, or the file
$LETHE_ADMIN_KEY, as lethectl tenant register). It is valid for --validity (at most 5m) and
accepted once.

It is refused while a migration of the guest is in flight (abort it first, with
lethectl migrations abort), and while the guest's host is live and still runs it. A tenant
forgets its own guests only; operators any, naming the tenant with --for. The audit records
(the broker's guest-forget, the keybroker's forget) name who forgot it and --reason.

It asks for confirmation on a terminal; with no terminal (a script) it needs --yes.`,
		Example: `  lethectl guests forget web --key keys/tenant.key --reason "VM deleted"
  lethectl guests forget web --for acme --admin-key admin/admin.key --reason "host h1 decommissioned" --yes`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm := args[0]
			if err := o.resolve(); err != nil {
				return err
			}
			tenant := cmp.Or(forTenant, o.Tenant)
			name := vm
			if tenant != "" {
				name = tenant + "/" + vm
			}
			signed, err := signForget(tenant, vm, reason, keyFile, adminKeyFile, validity)
			if err != nil {
				return fmt.Errorf("forgetting %s: %w", name, err)
			}
			if !yes {
				ok, err := confirm(cmd.InOrStdin(), cmd.ErrOrStderr(),
					fmt.Sprintf("Forget guest %s? Its memory key is destroyed and the broker drops its record; this cannot be undone.", name))
				if err != nil {
					return fmt.Errorf("forgetting %s: %w", name, err)
				}
				if !ok {
					return fmt.Errorf("forgetting %s: not confirmed", name)
				}
			}
			g, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Guest, error) {
				return c.ForgetGuest(ctx, &broker.ForgetGuestRequest{Tenant: forTenant, VM: vm, Reason: reason, Signed: signed})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), g, func(w io.Writer) {
				fmt.Fprintf(w, "forgot %s/%s (was on %s, epoch %d); its key is destroyed\n", g.Tenant, g.VM, g.Host, g.Epoch)
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	f := cmd.Flags()
	f.StringVar(&forTenant, "for", "", "operators: the tenant that owns the guest")
	f.StringVar(&reason, "reason", "", "why, recorded in the audit records")
	f.StringVar(&keyFile, "key", "", "the tenant's private policy key, tenant.key, to sign the forget with")
	f.StringVar(&adminKeyFile, "admin-key", "", "operators: the admin private key, PEM, to sign the forget with (default: the file $LETHE_ADMIN_KEY)")
	f.DurationVar(&validity, "validity", time.Minute, "how long the signed forget stays valid (at most 5m)")
	f.BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation (needed when stdin is not a terminal)")
	return cmd
}

// signForget signs the keybroker's forget of tenant's vm: with the tenant's policy key
// (keyFile), or else with the admin key (adminKeyFile, or the file $LETHE_ADMIN_KEY).
func signForget(tenant, vm, reason, keyFile, adminKeyFile string, validity time.Duration) ([]byte, error) {
	if tenant == "" {
		return nil, errors.New("the signed forget names the guest's tenant: set --tenant, or --for")
	}
	req := kbwire.ForgetGuestRequest{Tenant: tenant, VM: vm, Reason: reason}
	if keyFile != "" {
		key, err := policy.ReadPrivateKey(keyFile)
		if err != nil {
			return nil, fmt.Errorf("reading the tenant's key: %w", err)
		}
		return kbwire.SignTenant(kbwire.OpGuestForget, req, time.Now(), validity, key)
	}
	path := cmp.Or(adminKeyFile, os.Getenv("LETHE_ADMIN_KEY"))
	if path == "" {
		return nil, errors.New("no key to sign the forget with: --key (the tenant's policy key), or --admin-key or LETHE_ADMIN_KEY (an operator's admin key)")
	}
	key, err := policy.ReadPrivateKey(path)
	if err != nil {
		return nil, fmt.Errorf("reading admin key: %w", err)
	}
	return kbwire.SignAdmin(kbwire.OpGuestForget, req, time.Now(), validity, key)
}

// errNoTerminal is returned by confirm when there is no terminal to ask on.
var errNoTerminal = errors.New("stdin is not a terminal to confirm on: pass --yes")

// isTerminal reports whether r is a terminal; tests replace it.
var isTerminal = func(r io.Reader) bool {
	f, ok := r.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// confirm asks question on w and reads the answer from in, a terminal: only "y" or "yes"
// confirms. It returns errNoTerminal when in is not a terminal, so that a script never
// confirms by accident.
func confirm(in io.Reader, w io.Writer, question string) (bool, error) {
	if !isTerminal(in) {
		return false, errNoTerminal
	}
	fmt.Fprintf(w, "%s [y/N] ", question)
	answer, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return false, fmt.Errorf("reading the answer: %w", err)
	}
	switch strings.ToLower(strings.TrimSpace(answer)) {
	case "y", "yes":
		return true, nil
	}
	return false, nil
}

func newGuestsHistoryCmd() *cobra.Command {
	var (
		o                             brokerOpts
		trust                         logTrust
		forTenant, bundle, fromBundle string
		c                             historyCheck
		verify                        bool
	)
	cmd := &cobra.Command{
		Use:   "history VM [--verify --pub keybroker.pub] [--pinned FILE]",
		Short: "Show a guest's residency history from the keybroker's log, and verify it is complete",
		Long: `history fetches the guest's entries of the keybroker's residency log, each with its inclusion
proof against one signed checkpoint, and prints them: every adoption, release, reissue, denial,
commit, abort and cleanup of its keys, with the host the keys went to.

With --verify (and --pub) it verifies the checkpoint's signature and the witnesses required
(--witness, --min-witnesses), that every entry is in the log, and that the entries are the
guest's complete chain from its adoption, whose epochs follow one another and whose endings
destroyed the keys they had to: then it prints where the guest's keys have lived. With --pinned
it also checks that the checkpoint and the one in that file are of one log (a keybroker that
rewrote its log, or shows you another log than others, fails here); --update-pinned then writes
the newer checkpoint to that file, only once everything verified (and creates it the first time).

It exits 1 when the history does not verify, naming each problem. --bundle saves what was
fetched; --from-bundle verifies such a file offline, with no NATS. What it cannot prove: that
the keybroker did not withhold entries newer than the last it answered with.`,
		Example: `  lethectl guests history web --tenant acme
  lethectl guests history web --tenant acme --verify --pub keybroker.pub --pinned acme.checkpoint --update-pinned
  lethectl guests history web --tenant acme --verify --pub keybroker.pub --witness "$W1" --witnessed --bundle web.history
  lethectl guests history web --tenant acme --pub keybroker.pub --from-bundle web.history`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.resolve(); err != nil {
				return err
			}
			c.vm, c.tenant = args[0], forTenant
			if c.tenant == "" {
				c.tenant = o.Tenant
			}
			var src logSource
			if fromBundle != "" {
				b, err := os.ReadFile(fromBundle)
				if err != nil {
					return fmt.Errorf("reading bundle: %w", err)
				}
				var hb historyBundle
				if err := json.Unmarshal(b, &hb); err != nil || hb.History == nil {
					return fmt.Errorf("bundle %s: not a history bundle: %w", fromBundle, err)
				}
				if c.tenant == "" {
					c.tenant = hb.History.Tenant
				}
				src, verify = bundleSource{&hb}, true
			}
			if c.tenant == "" {
				return errors.New("no tenant: set --tenant (or --for) or LETHE_TENANT")
			}
			if c.updatePinned && c.pinned == "" {
				return errors.New("--update-pinned needs --pinned")
			}
			if verify || c.pinned != "" {
				if trust.pubFile == "" {
					return errors.New("--verify needs --pub, the keybroker's public key")
				}
				v, err := trust.load()
				if err != nil {
					return err
				}
				c.trust = v
			}
			var rec *recordingSource
			if src == nil {
				kc, closeFn, err := o.keybroker()
				if err != nil {
					return err
				}
				defer closeFn()
				rec = &recordingSource{logSource: kc}
				src = rec
			}
			ctx, cancel := o.callCtx(cmd.Context())
			defer cancel()
			res, err := checkHistory(ctx, src, c)
			if err != nil {
				return err
			}
			if bundle != "" && rec != nil {
				b, err := json.MarshalIndent(historyBundle{History: res.History, Consistency: rec.proof}, "", "  ")
				if err != nil {
					return err
				}
				if err := writeFileAtomic(bundle, append(b, '\n'), 0o644); err != nil {
					return err
				}
			}
			verified := c.trust != nil
			if err := o.show(cmd.OutOrStdout(), res.view(verified), func(w io.Writer) { res.print(w, verified) }); err != nil {
				return err
			}
			if res.Failure != nil {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	addBrokerFlags(cmd, &o, true)
	addLogTrustFlags(cmd, &trust, false)
	f := cmd.Flags()
	f.StringVar(&forTenant, "for", "", "operators: the tenant that owns the guest")
	f.BoolVar(&verify, "verify", false, "verify the history (needs --pub)")
	f.StringVar(&c.pinned, "pinned", "", "a checkpoint you pinned (log checkpoint --out): the history's must be of the same log")
	f.BoolVar(&c.updatePinned, "update-pinned", false, "write the history's checkpoint to --pinned once everything verified")
	f.BoolVar(&c.witnessed, "witnessed", false, "prove the entries against the newest checkpoint a witness cosigned (it may not hold the newest entries yet)")
	f.StringVar(&bundle, "bundle", "", "save what was fetched (the history and the consistency proof) to this file, for --from-bundle")
	f.StringVar(&fromBundle, "from-bundle", "", "verify a saved bundle offline, with no NATS (implies --verify)")
	cmd.MarkFlagsMutuallyExclusive("bundle", "from-bundle")
	return cmd
}
