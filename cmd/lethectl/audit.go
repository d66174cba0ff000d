package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/internal/natsauth"
)

// auditSchema is the schema of the audit records lethectl reads (docs/audit.md).
const auditSchema = "lethe.audit/v1"

func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Read the audit records of the broker and the keybroker (auditor)"}
	cmd.AddCommand(newAuditTailCmd())
	return cmd
}

func newAuditTailCmd() *cobra.Command {
	var o brokerOpts
	var follow bool
	var since time.Duration
	var apiPrefix string
	cmd := &cobra.Command{
		Use:   "tail [--since D] [--follow]",
		Short: "Print the audit records of stream LETHE_AUDIT",
		Long: `tail prints the audit records of stream LETHE_AUDIT (docs/audit.md), oldest first: from the
start of the stream, or those of the last --since. It connects as an auditor (a NATS user of
role auditor) and reads through an ordered consumer. --follow keeps printing new records until
interrupted. With -o json, each record is one JSON object per line, with its stream sequence
and subject. A message on an audit subject that is not a record of schema lethe.audit/v1 is
skipped and counted on standard error.`,
		Example: "  lethectl audit tail --user auditor --password ...\n  lethectl audit tail --since 24h --follow -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.resolve(); err != nil {
				return err
			}
			nc, err := dialNATS(&o, natsauth.RoleAuditor, "")
			if err != nil {
				return err
			}
			defer nc.Close()
			var start time.Time
			if since > 0 {
				start = time.Now().Add(-since)
			}
			skipped, err := tailAudit(cmd.Context(), nc, apiPrefix, start, follow, o.output == "json", cmd.OutOrStdout())
			if skipped > 0 {
				fmt.Fprintf(cmd.ErrOrStderr(), "%d messages on audit subjects were not audit records\n", skipped)
			}
			return err
		},
	}
	addNATSFlags(cmd.Flags(), &o)
	cmd.Flags().StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new records until interrupted")
	cmd.Flags().DurationVar(&since, "since", 0, "print the records of this last while only (0: from the start)")
	cmd.Flags().StringVar(&apiPrefix, "js-api-prefix", natsauth.AuditorAPIPrefix, "JetStream API prefix: the auditors' account imports the audit stream's API under "+natsauth.AuditorAPIPrefix+"; $JS.API on a server without authentication")
	return cmd
}

// auditLine is what lethectl shows of a record of either publisher: the keybroker's events
// (kind, decision) and the broker's records (action, by, target).
type auditLine struct {
	Schema      string    `json:"schema"`
	Time        time.Time `json:"time"`
	Kind        string    `json:"kind"`
	Action      string    `json:"action"`
	Decision    string    `json:"decision"`
	By          string    `json:"by"`
	Target      string    `json:"target"`
	MigrationID string    `json:"migrationId"`
	Tenant      string    `json:"tenant"`
	VM          string    `json:"vm"`
	Host        string    `json:"host"`
	State       string    `json:"state"`
	Reason      string    `json:"reason"`
	Reasons     []string  `json:"reasons"`
	Detail      string    `json:"detail"`
}

// tailAudit prints the records of the audit stream, reached under JetStream API prefix
// apiPrefix, from start (zero: the first) and returns how many messages it skipped as not
// records. Without follow it stops at the last record the stream held when it began.
func tailAudit(ctx context.Context, nc *nats.Conn, apiPrefix string, start time.Time, follow, asJSON bool, w io.Writer) (int, error) {
	js, err := jetstream.NewWithAPIPrefix(nc, apiPrefix)
	if err != nil {
		return 0, err
	}
	stream, err := js.Stream(ctx, natsauth.AuditStream)
	if err != nil {
		return 0, fmt.Errorf("opening stream %s: %w", natsauth.AuditStream, err)
	}
	last := stream.CachedInfo().State.LastSeq
	if !follow && (last == 0 || (!start.IsZero() && stream.CachedInfo().State.LastTime.Before(start))) {
		return 0, nil
	}
	cfg := jetstream.OrderedConsumerConfig{}
	if !start.IsZero() {
		cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &start
	}
	cons, err := js.OrderedConsumer(ctx, natsauth.AuditStream, cfg)
	if err != nil {
		return 0, fmt.Errorf("reading stream %s: %w", natsauth.AuditStream, err)
	}
	enc := json.NewEncoder(w)
	skipped := 0
	for {
		msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		switch {
		case errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, nats.ErrTimeout):
			if ctx.Err() != nil {
				return skipped, ctx.Err()
			}
			continue
		case err != nil:
			return skipped, fmt.Errorf("reading stream %s: %w", natsauth.AuditStream, err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return skipped, fmt.Errorf("reading stream %s: %w", natsauth.AuditStream, err)
		}
		var rec auditLine
		if json.Unmarshal(msg.Data(), &rec) != nil || rec.Schema != auditSchema {
			skipped++
		} else if asJSON {
			err = enc.Encode(struct {
				Seq     uint64          `json:"seq"`
				Subject string          `json:"subject"`
				Record  json.RawMessage `json:"record"`
			}{meta.Sequence.Stream, msg.Subject(), msg.Data()})
		} else {
			_, err = fmt.Fprintln(w, rec.text(msg.Subject()))
		}
		if err != nil {
			return skipped, err
		}
		if !follow && meta.Sequence.Stream >= last {
			return skipped, nil
		}
	}
}

// text is the record on one line: time, publisher/what, then the fields it has.
func (r *auditLine) text(subject string) string {
	what := strings.Replace(strings.TrimPrefix(subject, natsauth.AuditSubjectPrefix+"."), ".", "/", 1)
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %-28s", r.Time.UTC().Format(time.RFC3339), what)
	for _, f := range []struct{ k, v string }{
		{"decision", r.Decision}, {"by", r.By}, {"target", r.Target}, {"migration", r.MigrationID},
		{"tenant", r.Tenant}, {"vm", r.VM}, {"host", r.Host}, {"state", r.State},
		{"reason", r.Reason}, {"reasons", strings.Join(r.Reasons, "; ")}, {"detail", r.Detail},
	} {
		if f.v == "" {
			continue
		}
		if strings.ContainsAny(f.v, " \t\"") {
			fmt.Fprintf(&b, " %s=%q", f.k, f.v)
		} else {
			fmt.Fprintf(&b, " %s=%s", f.k, f.v)
		}
	}
	return b.String()
}
