package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/broker"
)

func newMigrationsEventsCmd() *cobra.Command {
	var o brokerOpts
	var follow bool
	cmd := &cobra.Command{
		Use:   "events MIGRATION [--follow]",
		Short: "Print a migration's events: phases, progress reports and audit records",
		Long: `events prints the events the broker published for a migration (stream LETHE_EVENTS), oldest
first: each phase it entered and after how long in the one before, each progress report of the
source agent, and audit records. Tenants read their own migrations' events, operators any.
--follow keeps printing new events until the migration ends. With -o json, each event is one
JSON object per line, with its sequence in the stream.`,
		Example: "  lethectl migrations events mig-ABC\n  lethectl migrations events mig-ABC --follow -o json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, closeFn, err := o.client()
			if err != nil {
				return err
			}
			defer closeFn()
			return printEvents(cmd.Context(), &o, c, args[0], follow, cmd.OutOrStdout())
		},
	}
	addBrokerFlags(cmd, &o, true)
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events until the migration ends")
	return cmd
}

// printEvents prints a migration's events page by page; following, it polls every 500 ms
// for more until the migration has ended and its last events are printed.
func printEvents(ctx context.Context, o *brokerOpts, c *broker.Client, id string, follow bool, w io.Writer) error {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	enc := json.NewEncoder(w)
	var after uint64
	ended := false
	for {
		cctx, cancel := o.callCtx(ctx)
		page, err := c.MigrationEvents(cctx, &broker.MigrationEventsRequest{ID: id, After: after})
		cancel()
		if err != nil {
			if follow && ctx.Err() != nil {
				return nil
			}
			return err
		}
		for _, ev := range page.Events {
			if o.output == "json" {
				if err := enc.Encode(ev); err != nil {
					return err
				}
				continue
			}
			fmt.Fprintln(w, eventLine(&ev.Event))
		}
		after = page.Next
		if page.More {
			continue
		}
		// The events of a migration's end are published after its record says so: one
		// more read after the end is seen.
		if !follow || ended {
			return nil
		}
		cctx, cancel = o.callCtx(ctx)
		m, err := c.GetMigration(cctx, id)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		ended = m.Phase.Terminal()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// eventLine renders an event on one line: its time, kind and what it says.
func eventLine(ev *broker.Event) string {
	at := ev.Time.Format("2006-01-02T15:04:05.000Z07:00")
	switch ev.Kind {
	case broker.EventPhase:
		s := fmt.Sprintf("%s  phase     %s", at, ev.Phase)
		if ev.From != "" {
			s += fmt.Sprintf(" (after %s in %s)", durationText(ev.InFrom), ev.From)
		}
		if ev.Downtime > 0 {
			s += ", downtime " + durationText(ev.Downtime)
		}
		if ev.Message != "" {
			s += ": " + ev.Message
		}
		return s
	case broker.EventProgress:
		p := ev.Progress
		if p == nil {
			return at + "  progress"
		}
		s := fmt.Sprintf("%s  progress  %s round %d: %s of %s sent, dirty %s/s", at, p.Phase, p.Round,
			bytesText(p.Bytes), bytesText(p.TotalBytes), bytesText(uint64(p.DirtyRate)))
		if p.Throughput > 0 {
			s += ", " + bytesText(uint64(p.Throughput)) + "/s"
		}
		switch {
		case p.NotConverging:
			s += ", not converging"
		case p.ETA > 0:
			s += ", ETA " + p.ETA.Round(time.Second).String()
		}
		if p.Downtime > 0 {
			s += ", downtime " + durationText(p.Downtime)
		}
		if p.Error != "" {
			s += ": " + p.Error
		}
		return s
	default:
		return fmt.Sprintf("%s  %-8s  %s", at, ev.Kind, ev.Message)
	}
}
