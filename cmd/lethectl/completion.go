package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/version"
)

// completionTimeout bounds a shell completion's whole call to the broker: a completion that
// cannot reach the broker offers nothing, quickly, and prints no error.
const completionTimeout = 1500 * time.Millisecond

// liveNames lists names the broker knows, each optionally followed by a tab and a
// description (as cobra completions take them).
type liveNames func(ctx context.Context, c *broker.Client) ([]string, error)

func guestNames(ctx context.Context, c *broker.Client) ([]string, error) {
	resp, err := c.ListGuests(ctx, &broker.ListGuestsRequest{})
	if err != nil {
		return nil, err
	}
	var names []string
	for _, g := range resp.Guests {
		names = append(names, g.VM+"\t"+g.Tenant+" on "+g.Host)
	}
	return names, nil
}

func hostNames(ctx context.Context, c *broker.Client) ([]string, error) {
	resp, err := c.ListHosts(ctx, &broker.ListHostsRequest{})
	if err != nil {
		return nil, err
	}
	var names []string
	for _, h := range resp.Hosts {
		names = append(names, fmt.Sprintf("%s\t%s %s", h.Host, h.Platform, h.State))
	}
	return names, nil
}

func migrationIDs(active bool) liveNames {
	return func(ctx context.Context, c *broker.Client) ([]string, error) {
		resp, err := c.ListMigrations(ctx, &broker.ListMigrationsRequest{Active: active})
		if err != nil {
			return nil, err
		}
		var ids []string
		for _, m := range resp.Migrations {
			ids = append(ids, fmt.Sprintf("%s\t%s/%s %s", m.ID, m.Tenant, m.VM, m.Phase))
		}
		return ids, nil
	}
}

func fleetOpIDs(ctx context.Context, c *broker.Client) ([]string, error) {
	resp, err := c.ListFleetOps(ctx, &broker.ListFleetOpsRequest{})
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, op := range resp.Operations {
		ids = append(ids, fmt.Sprintf("%s\t%s %s", op.ID, op.Kind, op.State))
	}
	return ids, nil
}

// Live completions by command path: of the first argument, and of flags.
var (
	argCompletions = map[string]liveNames{
		"lethectl migrate":           guestNames,
		"lethectl guests history":    guestNames,
		"lethectl guests forget":     guestNames,
		"lethectl hosts cordon":      hostNames,
		"lethectl hosts uncordon":    hostNames,
		"lethectl hosts drain":       hostNames,
		"lethectl migrations get":    migrationIDs(false),
		"lethectl migrations watch":  migrationIDs(false),
		"lethectl migrations abort":  migrationIDs(true),
		"lethectl migrations events": migrationIDs(false),
		"lethectl receipt get":       migrationIDs(false),
		"lethectl fleet get":         fleetOpIDs,
		"lethectl fleet watch":       fleetOpIDs,
		"lethectl fleet abort":       fleetOpIDs,
	}
	flagCompletions = map[string]map[string]liveNames{
		"lethectl migrate":      {"to": hostNames},
		"lethectl guests adopt": {"host": hostNames},
	}
)

// addCompletions makes the shell completion of every command under root complete live names
// (guests, hosts, migration and fleet operation ids, asked of the broker with the connection
// settings on the command line, the environment and the config file) and the values of
// --output, read from the flag's usage ("output format: text or json").
func addCompletions(root *cobra.Command) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		path := c.CommandPath()
		if names, ok := argCompletions[path]; ok && c.ValidArgsFunction == nil {
			c.ValidArgsFunction = func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
				if len(args) > 0 {
					return nil, cobra.ShellCompDirectiveNoFileComp
				}
				return completeLive(cmd, names, toComplete)
			}
		}
		for flag, names := range flagCompletions[path] {
			_ = c.RegisterFlagCompletionFunc(flag, func(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
				return completeLive(cmd, names, toComplete)
			})
		}
		if f := c.Flags().Lookup("output"); f != nil {
			if values := outputValues(f.Usage); len(values) > 0 {
				_ = c.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp))
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
}

// outputValues reads the formats of an --output flag from its usage, "output format: a, b
// (what b adds) or c".
func outputValues(usage string) []cobra.Completion {
	_, list, ok := strings.Cut(usage, "output format: ")
	if !ok {
		return nil
	}
	list, _, _ = strings.Cut(list, ";")
	var values []cobra.Completion
	for _, part := range strings.Split(strings.ReplaceAll(list, " or ", ", "), ", ") {
		if fields := strings.Fields(part); len(fields) > 0 && !strings.HasPrefix(fields[0], "(") {
			values = append(values, fields[0])
		}
	}
	return values
}

// completeLive asks the broker for names as cmd's connection flags say and returns those that
// start with toComplete; on any error, or after completionTimeout, none.
func completeLive(cmd *cobra.Command, names liveNames, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	o := &brokerOpts{Timeout: completionTimeout}
	for flag, dst := range map[string]*string{
		"config": &o.config, "nats-url": &o.URL, "creds": &o.Creds, "user": &o.User, "password": &o.Password, "tenant": &o.Tenant,
	} {
		if f := cmd.Flags().Lookup(flag); f != nil {
			*dst = f.Value.String()
		}
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	found := make(chan []string, 1)
	go func() { // the NATS connection itself is bounded by its own dial timeout, not ctx
		list, err := callBroker(ctx, o, names)
		if err != nil {
			list = nil
		}
		found <- list
	}()
	var list []string
	select {
	case list = <-found:
	case <-ctx.Done():
	}
	var out []cobra.Completion
	for _, n := range list {
		if strings.HasPrefix(n, toComplete) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, cobra.ShellCompDirectiveNoFileComp
}

// newManCmd returns the hidden "man DIR" command that writes a man page (section 1, roff) of
// each command into DIR, for `make man` and `make install`.
func newManCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "Write lethectl's man pages into DIR",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return writeManPages(cmd.Root(), args[0])
		},
	}
}

// writeManPages writes DIR/lethectl.1, DIR/lethectl-guests.1, … for root and every available
// command under it. The pages carry no date, so that they are reproducible.
func writeManPages(root *cobra.Command, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var walk func(c *cobra.Command) error
	walk = func(c *cobra.Command) error {
		f, err := os.Create(filepath.Join(dir, manName(c)+".1"))
		if err != nil {
			return err
		}
		writeManPage(f, c)
		if err := f.Close(); err != nil {
			return fmt.Errorf("writing man page: %w", err)
		}
		for _, sub := range c.Commands() {
			if sub.IsAvailableCommand() {
				if err := walk(sub); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return walk(root)
}

func manName(c *cobra.Command) string { return strings.ReplaceAll(c.CommandPath(), " ", "-") }

// roff escapes text for a roff line: backslashes, and a leading dot or quote that roff would
// read as a request.
func roff(text string) string {
	var b strings.Builder
	for line := range strings.Lines(strings.ReplaceAll(text, `\`, `\e`)) {
		if strings.HasPrefix(line, ".") || strings.HasPrefix(line, "'") {
			b.WriteString(`\&`)
		}
		b.WriteString(line)
	}
	return b.String()
}

func writeManPage(w io.Writer, c *cobra.Command) {
	name := manName(c)
	fmt.Fprintf(w, ".TH %q 1 \"\" %q \"Lethe Manual\"\n", strings.ToUpper(name), "Lethe "+version.Info().Version)
	fmt.Fprintf(w, ".SH NAME\n%s \\- %s\n", name, roff(c.Short))
	fmt.Fprintf(w, ".SH SYNOPSIS\n.B %s\n", roff(c.UseLine()))
	desc := c.Long
	if desc == "" {
		desc = c.Short
	}
	fmt.Fprintf(w, ".SH DESCRIPTION\n%s\n", roff(strings.TrimSpace(desc)))
	writeFlags := func(title string, flags []*flagDoc) {
		if len(flags) == 0 {
			return
		}
		fmt.Fprintf(w, ".SH %s\n", title)
		for _, f := range flags {
			fmt.Fprintf(w, ".TP\n%s\n%s\n", f.term, roff(f.usage))
		}
	}
	writeFlags("OPTIONS", flagDocs(c.NonInheritedFlags()))
	writeFlags("OPTIONS INHERITED FROM PARENT COMMANDS", flagDocs(c.InheritedFlags()))
	if c.Example != "" {
		fmt.Fprintf(w, ".SH EXAMPLE\n.nf\n%s\n.fi\n", roff(c.Example))
	}
	var see []string
	if c.HasParent() {
		see = append(see, fmt.Sprintf("\\fB%s\\fP(1)", manName(c.Parent())))
	}
	for _, sub := range c.Commands() {
		if sub.IsAvailableCommand() {
			see = append(see, fmt.Sprintf("\\fB%s\\fP(1)", manName(sub)))
		}
	}
	if len(see) > 0 {
		fmt.Fprintf(w, ".SH SEE ALSO\n%s\n", strings.Join(see, ", "))
	}
}

// flagDoc is a flag as a man page lists it.
type flagDoc struct{ term, usage string }

func flagDocs(fs *pflag.FlagSet) []*flagDoc {
	var docs []*flagDoc
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		term := fmt.Sprintf(`\fB--%s\fP`, f.Name)
		if f.Shorthand != "" {
			term = fmt.Sprintf(`\fB-%s\fP, %s`, f.Shorthand, term)
		}
		if f.Value.Type() != "bool" {
			term += fmt.Sprintf(`=\fI%s\fP`, roff(f.Value.Type()))
		}
		usage := f.Usage
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "[]" {
			usage += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		docs = append(docs, &flagDoc{term, usage})
	})
	return docs
}
