package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// brokerOpts are the settings of commands that call the broker. Precedence: flags, then
// environment (LETHE_NATS_URL, LETHE_NATS_CREDS, LETHE_NATS_USER, LETHE_NATS_PASSWORD,
// LETHE_TENANT), then the config file (--config, LETHE_CONFIG, or
// $XDG_CONFIG_HOME/lethe/lethectl.yaml; see configFile), then defaults.
type brokerOpts struct {
	config   string
	URL      string
	Creds    string
	User     string
	Password string
	// Tenant is the tenant to act as; empty acts as an operator.
	Tenant  string
	Timeout time.Duration
	output  string
}

// addNATSFlags adds the config file and NATS connection flags every networked command has.
func addNATSFlags(f *pflag.FlagSet, o *brokerOpts) {
	f.StringVar(&o.config, "config", "", "YAML config file whose keys are these flags' names (env LETHE_CONFIG; default $XDG_CONFIG_HOME/lethe/lethectl.yaml)")
	f.StringVar(&o.URL, "nats-url", "", "NATS server URL (env LETHE_NATS_URL; default nats://127.0.0.1:4222)")
	f.StringVar(&o.Creds, "creds", "", "NATS credentials file (env LETHE_NATS_CREDS)")
	f.StringVar(&o.User, "user", "", "NATS user (env LETHE_NATS_USER)")
	f.StringVar(&o.Password, "password", "", "NATS password (env LETHE_NATS_PASSWORD, or LETHE_NATS_PASSWORD_FILE naming a file that holds it)")
}

func addBrokerFlags(cmd *cobra.Command, o *brokerOpts, read bool) {
	f := cmd.Flags()
	addNATSFlags(f, o)
	f.StringVar(&o.Tenant, "tenant", "", "act as this tenant; empty acts as an operator (env LETHE_TENANT)")
	f.DurationVar(&o.Timeout, "timeout", 30*time.Second, "timeout of one broker call")
	if read {
		f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	}
}

// resolve fills unset settings from the environment and the config file.
func (o *brokerOpts) resolve() error {
	if o.output != "text" && o.output != "json" && o.output != "" {
		return fmt.Errorf("--output %q: want text or json", o.output)
	}
	path, named := configPath(o.config, os.Stderr)
	file, err := readConfigFile(path, named, os.Stderr)
	if err != nil {
		return err
	}
	pick := func(flag *string, env, fromFile, def string) {
		if *flag != "" {
			return
		}
		if v := os.Getenv(env); v != "" {
			*flag = v
		} else if fromFile != "" {
			*flag = fromFile
		} else {
			*flag = def
		}
	}
	pick(&o.URL, "LETHE_NATS_URL", file.NATSURL, nats.DefaultURL)
	pick(&o.Creds, "LETHE_NATS_CREDS", file.Creds, "")
	pick(&o.User, "LETHE_NATS_USER", file.User, "")
	if o.Password == "" {
		pw, err := envSecret("LETHE_NATS_PASSWORD")
		if err != nil {
			return err
		}
		o.Password = cmp.Or(pw, file.Password)
	}
	pick(&o.Tenant, "LETHE_TENANT", file.Tenant, "")
	return nil
}

// dial connects to NATS as o says: as a tenant with --tenant, else as an operator.
func (o *brokerOpts) dial() (*nats.Conn, error) {
	if err := o.resolve(); err != nil {
		return nil, err
	}
	role, name := natsauth.RoleOperator, ""
	if o.Tenant != "" {
		if err := agentapi.ValidName(o.Tenant); err != nil {
			return nil, fmt.Errorf("--tenant: %w", err)
		}
		role, name = natsauth.RoleTenant, o.Tenant
	}
	return dialNATS(o, role, name)
}

// client connects to NATS and returns a broker client and a function that closes it.
func (o *brokerOpts) client() (*broker.Client, func(), error) {
	nc, err := o.dial()
	if err != nil {
		return nil, nil, err
	}
	if o.Tenant != "" {
		return broker.NewTenantClient(nc, o.Tenant), nc.Close, nil
	}
	return broker.NewOperatorClient(nc), nc.Close, nil
}

// callCtx bounds one broker call.
func (o *brokerOpts) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, o.Timeout)
}

// callPages connects to the broker as o says and calls page with after "" and then with each
// token it returns, until it returns "" or an error. Each call has o's timeout of its own: a
// long listing is many calls.
func callPages(ctx context.Context, o *brokerOpts, page func(ctx context.Context, c *broker.Client, after string) (next string, err error)) error {
	c, closeFn, err := o.client()
	if err != nil {
		return err
	}
	defer closeFn()
	after := ""
	for {
		cctx, cancel := o.callCtx(ctx)
		after, err = page(cctx, c, after)
		cancel()
		if err != nil || after == "" {
			return err
		}
	}
}

// callBroker connects to the broker as o says, runs one call with o's timeout, and closes the
// connection.
func callBroker[T any](ctx context.Context, o *brokerOpts, call func(context.Context, *broker.Client) (T, error)) (T, error) {
	c, closeFn, err := o.client()
	if err != nil {
		var zero T
		return zero, err
	}
	defer closeFn()
	ctx, cancel := o.callCtx(ctx)
	defer cancel()
	return call(ctx, c)
}

// show prints v as JSON with --output json, or with text otherwise.
func (o *brokerOpts) show(w io.Writer, v any, text func(io.Writer)) error {
	if o.output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	text(w)
	return nil
}

func table(w io.Writer, header string, rows func(tw io.Writer)) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	rows(tw)
	tw.Flush()
}

func newMigrationsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "migrations", Short: "List, show, watch and abort migrations and read their events"}
	cmd.AddCommand(newMigrationsListCmd(), newMigrationsGetCmd(), newMigrationsWatchCmd(), newMigrationsEventsCmd(), newMigrationsAbortCmd())
	return cmd
}

func newMigrationsListCmd() *cobra.Command {
	var o brokerOpts
	var active, ended, all bool
	var req broker.ListMigrationsRequest
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List migrations, newest first, a page at a time",
		Long: `List migrations, newest first (by creation time, then id), a page at a time: --limit
migrations (default ` + fmt.Sprint(broker.DefaultListLimit) + `, at most ` + fmt.Sprint(broker.MaxListLimit) + `). When more exist, the text output ends with a
hint on stderr and the JSON output carries "next": pass it to --after for the next page, or
give --all to read every page.`,
		Example: "  lethectl migrations list --active --tenant acme\n  lethectl migrations list --vm web --all -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case active && ended:
				return errors.New("--active and --ended exclude each other")
			case active:
				req.State = broker.ListActive
			case ended:
				req.State = broker.ListEnded
			}
			var resp *broker.ListMigrationsResponse
			var err error
			if all {
				// Fewer, fuller pages: a listing with the archive reads it whole for each.
				req.Limit = cmp.Or(req.Limit, broker.MaxListLimit)
				resp = &broker.ListMigrationsResponse{Migrations: []*broker.Migration{}}
				err = callPages(cmd.Context(), &o, func(ctx context.Context, c *broker.Client, after string) (string, error) {
					req.After = cmp.Or(after, req.After)
					page, err := c.ListMigrations(ctx, &req)
					if err != nil {
						return "", err
					}
					resp.Migrations = append(resp.Migrations, page.Migrations...)
					return page.Next, nil
				})
			} else {
				resp, err = callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.ListMigrationsResponse, error) {
					return c.ListMigrations(ctx, &req)
				})
			}
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), resp, func(w io.Writer) {
				table(w, "ID\tTENANT\tVM\tSOURCE\tDESTINATION\tPHASE\tCREATED", func(tw io.Writer) {
					for _, m := range resp.Migrations {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Tenant, m.VM, m.Source, m.Destination, m.Phase, m.Created.Format(time.RFC3339))
					}
				})
				if resp.Next != "" {
					fmt.Fprintf(cmd.ErrOrStderr(), "More migrations: --after %s for the next page, or --all.\n", resp.Next)
				}
			})
		},
	}
	addBrokerFlags(cmd, &o, true)
	f := cmd.Flags()
	f.BoolVar(&active, "active", false, "only migrations that are not finished")
	f.BoolVar(&ended, "ended", false, "only finished migrations")
	f.StringVar(&req.VM, "vm", "", "only migrations of this guest")
	f.IntVar(&req.Limit, "limit", 0, fmt.Sprintf("migrations per page (0: %d; at most %d)", broker.DefaultListLimit, broker.MaxListLimit))
	f.StringVar(&req.After, "after", "", "start after the page whose next token this is")
	f.BoolVar(&all, "all", false, "read every page")
	f.BoolVar(&req.Archived, "archived", false, "also list the ended migrations the broker archived (slower: it reads the whole archive)")
	return cmd
}

func newMigrationsGetCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:     "get MIGRATION",
		Short:   "Show a migration",
		Example: "  lethectl migrations get mig-ABC -o json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Migration, error) {
				return c.GetMigration(ctx, args[0])
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), m, func(w io.Writer) { printMigration(w, m) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

func printMigration(w io.Writer, m *broker.Migration) {
	fmt.Fprintf(w, "Migration:    %s\nGuest:        %s/%s (epoch %d, %s)\nFrom → to:    %s → %s\nPhase:        %s (since %s)\nRequested by: %s at %s\n",
		m.ID, m.Tenant, m.VM, m.Epoch, m.Platform, m.Source, m.Destination, m.Phase, m.PhaseSince.Format(time.RFC3339), m.RequestedBy, m.Created.Format(time.RFC3339))
	if m.Progress != nil {
		fmt.Fprintf(w, "Progress:     %s\n", progressLine(m))
	}
	if m.Phase == broker.PhaseRequested && m.Waiting != "" {
		fmt.Fprintf(w, "Waiting:      %s\n", strings.TrimPrefix(m.Waiting, "waiting: "))
	}
	if m.AbortReason != "" {
		fmt.Fprintf(w, "Abort reason: %s\n", m.AbortReason)
	}
	for _, n := range m.Notes {
		fmt.Fprintf(w, "Note:         %s\n", n)
	}
	if m.Outcome != "" {
		fmt.Fprintf(w, "Outcome:      %s at %s\n", m.Outcome, m.Finished.Format(time.RFC3339))
	}
	if m.MaxDowntime > 0 {
		fmt.Fprintf(w, "Max downtime: %s\n", durationText(m.MaxDowntime))
	}
	if m.Progress != nil && m.Progress.PostCopy {
		fmt.Fprintf(w, "Post-copy:    yes (the guest ran at the destination while its last pages arrived)\n")
	}
	if m.Downtime > 0 {
		fmt.Fprintf(w, "Downtime:     %s (measured by the %s)\n", durationText(m.Downtime), cmp.Or(m.DowntimeSource, "source"))
	}
	printAttempts(w, m)
	printTimeline(w, m)
	printRounds(w, m)
}

// printAttempts writes the destinations the keybroker denied before m's, and why.
func printAttempts(w io.Writer, m *broker.Migration) {
	if len(m.Attempts) == 0 {
		return
	}
	fmt.Fprintln(w, "Denied destinations:")
	table(w, "  DESTINATION\tDENIED AT\tREASON", func(tw io.Writer) {
		for _, a := range m.Attempts {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", a.Destination, a.At.Format(time.RFC3339), a.Reason)
		}
	})
}

func newMigrationsWatchCmd() *cobra.Command {
	var o brokerOpts
	cmd := &cobra.Command{
		Use:     "watch MIGRATION",
		Short:   "Follow a migration's progress until it ends, then print a summary",
		Example: "  lethectl migrations watch mig-ABC",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, closeFn, err := o.client()
			if err != nil {
				return err
			}
			defer closeFn()
			return watchMigration(cmd.Context(), &o, c, args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	addBrokerFlags(cmd, &o, true)
	return cmd
}

func newMigrationsAbortCmd() *cobra.Command {
	var o brokerOpts
	var reason string
	cmd := &cobra.Command{
		Use:     "abort MIGRATION",
		Short:   "Abort a migration (before cutover); the guest stays at the source",
		Example: "  lethectl migrations abort mig-ABC --reason maintenance-cancelled",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := callBroker(cmd.Context(), &o, func(ctx context.Context, c *broker.Client) (*broker.Migration, error) {
				return c.AbortMigration(ctx, &broker.AbortMigrationRequest{ID: args[0], Reason: reason})
			})
			if err != nil {
				return err
			}
			return o.show(cmd.OutOrStdout(), m, func(w io.Writer) { fmt.Fprintf(w, "%s: %s\n", m.ID, m.Phase) })
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the migration and its receipt")
	return cmd
}

// watchMigration polls a migration every 500 ms, drawing its progress on stderr (see
// progressOut), until it ends, then prints its summary; an aborted migration ends lethectl
// with status 1. Interrupted (Ctrl-C or SIGTERM), it says
// that the migration goes on and how to follow or abort it, and ends with status 130.
func watchMigration(ctx context.Context, o *brokerOpts, c *broker.Client, id string, stdout, stderr io.Writer) error {
	out := newProgressOut(stderr, o.output != "json")
	view := &progressView{now: time.Now}
	m, stopped, err := follow(ctx, o, out,
		func(ctx context.Context) (*broker.Migration, error) { return c.GetMigration(ctx, id) },
		func(m *broker.Migration) bool {
			out.draw(progressKey(m), func(width int) string { return view.line(m, width) })
			return m.Phase.Terminal()
		})
	switch {
	case stopped:
		return interrupted(stderr, id, m)
	case err != nil:
		return err
	}
	if err := o.show(stdout, m, func(w io.Writer) { printSummary(w, m) }); err != nil {
		return err
	}
	if m.Phase != broker.PhaseErased {
		return &exitError{code: 1}
	}
	return nil
}

// follow asks get every 500 ms and hands each answer to shown, which draws it and says
// whether it is the last, until it is or ctx ends. It returns the last answer (nil if none
// came), whether ctx ended first, and get's error; out is ended in every case.
func follow[T any](ctx context.Context, o *brokerOpts, out *progressOut, get func(context.Context) (*T, error), shown func(*T) bool) (last *T, stopped bool, err error) {
	defer out.end()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		cctx, cancel := o.callCtx(ctx)
		got, err := get(cctx)
		cancel()
		if ctx.Err() != nil {
			return last, true, nil
		}
		if err != nil {
			return last, false, err
		}
		last = got
		if shown(last) {
			return last, false, nil
		}
		select {
		case <-ctx.Done():
			return last, true, nil
		case <-t.C:
		}
	}
}

// interrupted tells, when lethectl stops following a migration (Ctrl-C), that the migration
// goes on without it, and how to follow or abort it.
func interrupted(w io.Writer, id string, m *broker.Migration) error {
	phase := "still running"
	if m != nil {
		phase = "in phase " + string(m.Phase)
	}
	fmt.Fprintf(w, "interrupted: migration %s goes on (%s); follow it with `lethectl migrations watch %s`, abort it with `lethectl migrations abort %s`\n", id, phase, id, id)
	return &exitError{code: 130}
}

// printTimeline writes the phases m entered, when, and how long each lasted.
func printTimeline(w io.Writer, m *broker.Migration) {
	if len(m.Timeline) == 0 {
		return
	}
	fmt.Fprintln(w, "Timeline:")
	table(w, "  PHASE\tENTERED\tDURATION", func(tw io.Writer) {
		for i, e := range m.Timeline {
			d := "-"
			if i < len(m.Timeline)-1 {
				d = durationText(e.Duration)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", e.Phase, e.Entered.Format(time.RFC3339Nano), d)
		}
	})
}

// printRounds writes m's pre-copy rounds.
func printRounds(w io.Writer, m *broker.Migration) {
	if len(m.Rounds) == 0 {
		return
	}
	fmt.Fprintln(w, "Rounds:")
	table(w, "  ROUND\tPAGES\tBYTES\tDIRTY/S\tTHROUGHPUT/S\tDURATION", func(tw io.Writer) {
		for _, r := range m.Rounds {
			round := strconv.Itoa(r.Round)
			if r.Final {
				round += " (final)"
			}
			fmt.Fprintf(tw, "  %s\t%d\t%s\t%s\t%s\t%s\n", round, r.Pages, bytesText(r.Bytes),
				bytesText(uint64(r.DirtyRate)), bytesText(uint64(r.Throughput)), durationText(r.Duration))
		}
	})
}

// durationText rounds d to what a reader compares: milliseconds below a minute.
func durationText(d time.Duration) string {
	if d < time.Minute {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func bytesText(b uint64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%d B", b)
	}
	div, exp := uint64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(b)/float64(div), "KMGTPE"[exp])
}
