//go:build linux

package broker_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/clustertest"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/ptytest"
)

// auditDoc is the auditors' guide, whose nats CLI command TestAuditDocNATSCLI runs.
const auditDoc = "../docs/audit.md"

// TestAuditDocNATSCLI: the nats CLI command docs/audit.md gives auditors, run as the guide
// writes it (with the password, the server's URL and a count to stop at added) against a server
// with Lethe's permissions, prints the broker's audit records and no permissions violation;
// `stream view`, which the guide warns against, prints the records with a violation for each
// acknowledgement; a consumer created without a name, as the JetStream API before named
// consumers creates them, is refused.
func TestAuditDocNATSCLI(t *testing.T) {
	cli, err := clustertest.NATSCLI()
	switch {
	case errors.Is(err, clustertest.ErrNotFetched) && os.Getenv("CI") != "true":
		t.Skipf("no nats CLI here: %v", err)
	case err != nil:
		t.Fatal(err)
	}
	args := docNATSCommand(t)

	e := authEnv(t)
	e.standard()
	ctx := t.Context()
	if _, err := e.operator().CordonHost(ctx, &broker.CordonRequest{Host: "h2", Reason: "firmware"}); err != nil {
		t.Fatal(err)
	}
	cons, err := e.jetstream().OrderedConsumer(ctx, broker.AuditStream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{broker.AuditSubject(broker.AuditHostState)},
	})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := cons.Next(jetstream.FetchMaxWait(20 * time.Second))
	if err != nil {
		t.Fatalf("waiting for the cordon's audit record: %v", err)
	}
	meta, err := rec.Metadata()
	if err != nil {
		t.Fatal(err)
	}
	printed := func(out string) bool {
		return strings.Contains(out, rec.Subject()) && strings.Contains(out, string(rec.Data()))
	}
	const violation = "Permissions Violation"

	// The guide's command follows the stream: it stops once it has printed the records so far.
	count := strconv.FormatUint(meta.Sequence.Stream, 10)
	out := runNATS(t, cli, slices.Concat(args, []string{"--count", count, "--server", e.srv.URL})...)
	if !printed(out) || strings.Contains(out, violation) {
		t.Errorf("nats %s printed\n%s\nwant the record on %s, %s, and no %q", strings.Join(args, " "), out, rec.Subject(), rec.Data(), violation)
	}

	// stream view, with the same connection flags, on a terminal (it pages on one alone) and
	// a page as long as the stream: it shows the records, then waits at its prompt for the next
	// page while the server refuses its acknowledgements.
	sub := slices.Index(args, "sub")
	if sub < 0 {
		t.Fatalf("the guide's command %q is not a sub command", args)
	}
	view := slices.Concat(args[:sub], []string{"stream", "view", broker.AuditStream, count, "--server", e.srv.URL})
	refused := violation + ` for Publish to "$JS.ACK.` + broker.AuditStream
	out, ok := runInTerminal(t, cli, func(out string) bool { return printed(out) && strings.Contains(out, refused) }, view...)
	if !ok {
		t.Errorf("nats %s printed\n%s\nwant the record on %s, %s, and its refused acknowledgement", strings.Join(view, " "), out, rec.Subject(), rec.Data())
	}

	// A consumer created without a name: the auditor may not publish that request.
	auditor, errs := connectAs(t, e, natsauth.RoleAuditor, "")
	if err := auditor.PublishRequest(natsauth.AuditorAPIPrefix+".CONSUMER.CREATE."+broker.AuditStream, auditor.NewInbox(), []byte(`{"stream_name":"LETHE_AUDIT","config":{}}`)); err != nil {
		t.Fatal(err)
	}
	if err := auditor.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errs:
		if !errors.Is(err, nats.ErrPermissionViolation) {
			t.Errorf("creating a consumer without a name: %v, want a permission violation", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("creating a consumer without a name: no permission violation")
	}
}

// docNATSCommand returns the arguments of the nats CLI command in auditDoc's section on the
// nats CLI, with the auditor's password in place of the guide's ellipsis.
func docNATSCommand(t *testing.T) []string {
	t.Helper()
	doc, err := os.ReadFile(auditDoc)
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(doc), "With the nats CLI")
	if !ok {
		t.Fatalf("%s has no section on the nats CLI", auditDoc)
	}
	_, block, ok := strings.Cut(section, "\n```\n")
	if !ok {
		t.Fatalf("%s: no code block after the nats CLI's paragraph", auditDoc)
	}
	block, _, _ = strings.Cut(block, "```")
	line, ok := strings.CutPrefix(strings.TrimSpace(block), "nats ")
	if !ok || strings.Contains(line, "\n") {
		t.Fatalf("%s: the nats CLI's block is not one nats command:\n%s", auditDoc, block)
	}
	args, err := shellWords(line)
	if err != nil {
		t.Fatalf("%s: %v", auditDoc, err)
	}
	password := ""
	for _, u := range authUsers {
		if u.Role == natsauth.RoleAuditor {
			password = u.Password
		}
	}
	for i, a := range args {
		if a == "…" {
			args[i] = password
		}
	}
	return args
}

// shellWords splits line into words as a POSIX shell does for the guide's commands: words
// separated by blanks, single quotes keeping what they enclose as it is.
func shellWords(line string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for _, r := range line {
		switch {
		case quoted && r == '\'':
			quoted = false
		case quoted:
			w.WriteRune(r)
		case r == '\'':
			quoted, inWord = true, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		case strings.ContainsRune(`"\$`+"`", r):
			return nil, fmt.Errorf("%q: only single quotes are understood", line)
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("%q: unterminated quote", line)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// natsEnv is the nats CLI's environment: an empty home, so that no configuration context of
// the machine's applies.
func natsEnv(t *testing.T) []string {
	home := t.TempDir()
	return []string{"HOME=" + home, "XDG_CONFIG_HOME=" + home, "TERM=dumb"}
}

// runNATS runs the nats CLI bin with args until it exits and returns what it printed.
func runNATS(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = natsEnv(t)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nats %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// runInTerminal runs the nats CLI bin with args on a pseudo-terminal until what it printed
// satisfies done, then stops it. It returns what the CLI printed and whether done was
// satisfied before the CLI exited or a minute passed.
func runInTerminal(t *testing.T, bin string, done func(out string) bool, args ...string) (string, bool) {
	t.Helper()
	master, slave := ptytest.Open(t, 50, 200)
	defer master.Close()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = natsEnv(t)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	var out strings.Builder
	ok := false
	buf := make([]byte, 4096)
	// Reads end when the CLI, the slave's last holder, exits (EIO on Linux).
	for !ok {
		n, err := master.Read(buf)
		out.Write(buf[:n])
		ok = done(out.String())
		if err != nil {
			break
		}
	}
	cancel()
	_ = cmd.Wait()
	return out.String(), ok
}
