package daemon_test

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/daemon"
)

// settings are the values of testFlags.
type settings struct {
	URL     string
	Lease   time.Duration
	Streams int
	Dev     bool
	Roots   []string
	Export  string
}

type listValue []string

func (l *listValue) String() string { return strings.Join(*l, ",") }
func (l *listValue) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// testFlags declares settings the way the daemons do.
func testFlags(s *settings) *daemon.Flags {
	fs := daemon.NewFlags("lethe-test")
	fs.SetOutput(io.Discard)
	var config string
	fs.String(&config, "config", "LETHE_TEST_CONFIG", "", "configuration file")
	fs.String(&s.URL, "nats-url", "LETHE_TEST_NATS_URL", "nats://default:4222", "NATS URL")
	fs.Duration(&s.Lease, "lease", "LETHE_TEST_LEASE", 60*time.Second, "lease")
	fs.Int(&s.Streams, "streams", "LETHE_TEST_STREAMS", 4, "streams (0: 4)")
	fs.Bool(&s.Dev, "dev", "LETHE_TEST_DEV", false, "development mode")
	fs.List((*listValue)(&s.Roots), "trust-roots", "LETHE_TEST_ROOTS", filepath.SplitList, "roots; repeatable (a path list)")
	fs.String(&s.Export, "export", "", "", "write something and exit")
	return fs
}

// testEnv are the variables testFlags reads, and one it does not.
var testEnv = []string{"LETHE_TEST_CONFIG", "LETHE_TEST_NATS_URL", "LETHE_TEST_LEASE", "LETHE_TEST_DEV", "LETHE_TEST_ROOTS", "LETHE_TEST_STREAMS", "LETHE_TEST_UNKNOWN"}

// clearTestEnv sets every variable of testEnv to "", which counts as unset.
func clearTestEnv(t *testing.T) {
	for _, k := range testEnv {
		t.Setenv(k, "")
	}
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "lethe-test.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestParsePrecedence(t *testing.T) {
	const file = `
# a comment
nats-url: nats://file:4222
lease: 90s
streams: 8
dev: true
trust-roots:
  - /etc/lethe/roots-a
  - /etc/lethe/roots-b
`
	tests := map[string]struct {
		env  map[string]string
		args []string
		file string // "" means no --config
		want settings
	}{
		"defaults": {
			want: settings{URL: "nats://default:4222", Lease: 60 * time.Second, Streams: 4},
		},
		"file over defaults": {
			file: file,
			want: settings{URL: "nats://file:4222", Lease: 90 * time.Second, Streams: 8, Dev: true, Roots: []string{"/etc/lethe/roots-a", "/etc/lethe/roots-b"}},
		},
		"environment over file": {
			env:  map[string]string{"LETHE_TEST_NATS_URL": "nats://env:4222", "LETHE_TEST_LEASE": "30s"},
			file: file,
			want: settings{URL: "nats://env:4222", Lease: 30 * time.Second, Streams: 8, Dev: true, Roots: []string{"/etc/lethe/roots-a", "/etc/lethe/roots-b"}},
		},
		"flag over environment and file": {
			env:  map[string]string{"LETHE_TEST_NATS_URL": "nats://env:4222"},
			args: []string{"--nats-url", "nats://flag:4222", "--trust-roots", "/flag/roots", "--dev=false"},
			file: file,
			want: settings{URL: "nats://flag:4222", Lease: 90 * time.Second, Streams: 8, Roots: []string{"/flag/roots"}},
		},
		"empty environment variable counts as unset": {
			env:  map[string]string{"LETHE_TEST_NATS_URL": ""},
			file: "nats-url: nats://file:4222\n",
			want: settings{URL: "nats://file:4222", Lease: 60 * time.Second, Streams: 4},
		},
		"empty file": {
			file: "# nothing set\n",
			want: settings{URL: "nats://default:4222", Lease: 60 * time.Second, Streams: 4},
		},
		"environment over defaults": {
			env:  map[string]string{"LETHE_TEST_NATS_URL": "nats://env:4222", "LETHE_TEST_LEASE": "2m", "LETHE_TEST_STREAMS": "0x10", "LETHE_TEST_DEV": "true", "LETHE_TEST_ROOTS": "/e1" + string(filepath.ListSeparator) + "/e2"},
			want: settings{URL: "nats://env:4222", Lease: 2 * time.Minute, Streams: 16, Dev: true, Roots: []string{"/e1", "/e2"}},
		},
		"flag over environment": {
			env:  map[string]string{"LETHE_TEST_LEASE": "2m", "LETHE_TEST_DEV": "true", "LETHE_TEST_ROOTS": "/e1"},
			args: []string{"--lease", "5s", "--dev=false", "--trust-roots", "/flag"},
			want: settings{URL: "nats://default:4222", Lease: 5 * time.Second, Streams: 4, Roots: []string{"/flag"}},
		},
		"environment list over file list": {
			env:  map[string]string{"LETHE_TEST_ROOTS": "/e1"},
			file: file,
			want: settings{URL: "nats://file:4222", Lease: 90 * time.Second, Streams: 8, Dev: true, Roots: []string{"/e1"}},
		},
		"unknown environment variable ignored": {
			env:  map[string]string{"LETHE_TEST_UNKNOWN": "nats://env:4222"},
			want: settings{URL: "nats://default:4222", Lease: 60 * time.Second, Streams: 4},
		},
		"quoted and hex scalars": {
			file: "nats-url: \"nats://quoted:4222\"\nstreams: 0x10\n",
			want: settings{URL: "nats://quoted:4222", Lease: 60 * time.Second, Streams: 16},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			clearTestEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			args := tc.args
			if tc.file != "" {
				args = append([]string{"--config", writeFile(t, tc.file)}, args...)
			}
			var got settings
			if err := testFlags(&got).Parse(args); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("settings (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseConfigFromEnvironment(t *testing.T) {
	clearTestEnv(t)
	t.Setenv("LETHE_TEST_CONFIG", writeFile(t, "streams: 2\n"))
	var got settings
	if err := testFlags(&got).Parse(nil); err != nil {
		t.Fatal(err)
	}
	if got.Streams != 2 {
		t.Errorf("streams = %d, want 2 from the file LETHE_TEST_CONFIG names", got.Streams)
	}
}

func TestParseStrictErrors(t *testing.T) {
	tests := map[string]struct {
		file string
		want []string // error messages without the file name
	}{
		"unknown key": {
			file: "nats-url: nats://a:4222\nnats-ulr: nats://b:4222\n",
			want: []string{`:2:1: nats-ulr: unknown key: not a flag of lethe-test`},
		},
		"duplicate key": {
			file: "streams: 1\nstreams: 2\n",
			want: []string{`:2:1: malformed YAML: mapping key "streams" already defined at [1:1]`},
		},
		"invalid duration": {
			file: "lease: soon\n",
			want: []string{`:1:8: lease: invalid value "soon": parse error`},
		},
		"list for a scalar flag": {
			file: "nats-url:\n  - a\n  - b\n",
			want: []string{`:1:1: nats-url: expected one value, got a list (only repeatable flags take lists)`},
		},
		"null": {
			file: "nats-url:\n",
			want: []string{`:1:1: nats-url: no value (write "" for an empty one)`},
		},
		"mapping value": {
			file: "nats-url:\n  host: a\n",
			want: []string{`:2:3: nats-url: expected a value, got a mapping`},
		},
		"command-line only": {
			file: "export: /tmp/x\n",
			want: []string{`:1:1: export: command-line only: give --export on the command line`},
		},
		"config in config": {
			file: "config: other.yaml\n",
			want: []string{`:1:1: config: a configuration file cannot name another`},
		},
		"alias": {
			file: "nats-url: &u nats://a:4222\nstreams: *u\n",
			want: []string{`:1:11: nats-url: expected plain YAML, got an anchor (anchors, aliases and tags are not allowed)`, `:2:10: streams: expected plain YAML, got an alias (anchors, aliases and tags are not allowed)`},
		},
		"not a mapping": {
			file: "- a\n- b\n",
			want: []string{`:1:1: expected a mapping of flag names to values, got a list`},
		},
		"several errors at once": {
			file: "nats-url: nats://a:4222\nfoo: 1\nbar: 2\n",
			want: []string{`:2:1: foo: unknown key: not a flag of lethe-test`, `:3:1: bar: unknown key: not a flag of lethe-test`},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			clearTestEnv(t)
			path := writeFile(t, tc.file)
			var got settings
			err := testFlags(&got).Parse([]string{"--config", path})
			if err == nil {
				t.Fatal("Parse succeeded, want an error")
			}
			var msgs []string
			for _, e := range configErrors(err) {
				if e.File != path {
					t.Errorf("error names file %q, want %q", e.File, path)
				}
				msgs = append(msgs, strings.TrimPrefix(e.Error(), path))
			}
			// A flag's own parse error text is the standard library's; keep its start.
			for i := range msgs {
				if j := strings.Index(msgs[i], ": parse error"); j >= 0 {
					msgs[i] = msgs[i][:j+len(": parse error")]
				}
			}
			if diff := cmp.Diff(tc.want, msgs); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(settings{URL: "nats://default:4222", Lease: 60 * time.Second, Streams: 4}, got); diff != "" {
				t.Errorf("an invalid file changed settings (-want +got):\n%s", diff)
			}
		})
	}
}

// configErrors returns the ConfigErrors in err's tree, in order.
func configErrors(err error) []*daemon.ConfigError {
	var out []*daemon.ConfigError
	var walk func(error)
	walk = func(err error) {
		switch e := err.(type) {
		case nil:
		case *daemon.ConfigError:
			out = append(out, e)
		case interface{ Unwrap() []error }:
			for _, x := range e.Unwrap() {
				walk(x)
			}
		case interface{ Unwrap() error }:
			walk(e.Unwrap())
		}
	}
	walk(err)
	return out
}

func TestParseMissingFile(t *testing.T) {
	clearTestEnv(t)
	var s settings
	err := testFlags(&s).Parse([]string{"--config", filepath.Join(t.TempDir(), "none.yaml")})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("err = %v, want one wrapping os.ErrNotExist", err)
	}
}

func TestParseEnvironmentErrors(t *testing.T) {
	tests := map[string]struct {
		env  map[string]string
		want string
	}{
		"duration": {map[string]string{"LETHE_TEST_LEASE": "soon"}, `environment variable LETHE_TEST_LEASE: invalid value "soon": parse error`},
		"int":      {map[string]string{"LETHE_TEST_STREAMS": "four"}, `environment variable LETHE_TEST_STREAMS: invalid value "four": parse error`},
		"bool":     {map[string]string{"LETHE_TEST_DEV": "maybe"}, `environment variable LETHE_TEST_DEV: invalid value "maybe": parse error`},
		"two at once": {map[string]string{"LETHE_TEST_DEV": "maybe", "LETHE_TEST_LEASE": "soon"},
			"environment variable LETHE_TEST_DEV: invalid value \"maybe\": parse error\nenvironment variable LETHE_TEST_LEASE: invalid value \"soon\": parse error"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			clearTestEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var got settings
			err := testFlags(&got).Parse(nil)
			if err == nil || err.Error() != tc.want {
				t.Errorf("err = %v, want %s", err, tc.want)
			}
		})
	}
	t.Run("flag hides a bad environment variable", func(t *testing.T) {
		clearTestEnv(t)
		t.Setenv("LETHE_TEST_LEASE", "soon")
		var got settings
		if err := testFlags(&got).Parse([]string{"--lease", "1s"}); err != nil || got.Lease != time.Second {
			t.Errorf("err = %v, lease %v: want the flag's 1s", err, got.Lease)
		}
	})
}

func TestFlagsDeclaration(t *testing.T) {
	var s settings
	fs := testFlags(&s)
	tests := map[string]struct {
		env, desc, usage string
		repeatable       bool
	}{
		"nats-url":    {"LETHE_TEST_NATS_URL", "NATS URL", "NATS URL (env LETHE_TEST_NATS_URL)", false},
		"streams":     {"LETHE_TEST_STREAMS", "streams (0: 4)", "streams (0: 4) (env LETHE_TEST_STREAMS)", false},
		"trust-roots": {"LETHE_TEST_ROOTS", "roots; repeatable (a path list)", "roots; repeatable (a path list) (env LETHE_TEST_ROOTS)", true},
		"export":      {"", "write something and exit", "write something and exit", false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := fs.EnvVar(name); got != tc.env {
				t.Errorf("EnvVar = %q, want %q", got, tc.env)
			}
			if got := fs.Description(name); got != tc.desc {
				t.Errorf("Description = %q, want %q", got, tc.desc)
			}
			if got := fs.Lookup(name).Usage; got != tc.usage {
				t.Errorf("usage in the help = %q, want %q", got, tc.usage)
			}
			if got := fs.Repeatable(name); got != tc.repeatable {
				t.Errorf("Repeatable = %v, want %v", got, tc.repeatable)
			}
		})
	}
}

func TestReferenceAndReplaceSection(t *testing.T) {
	// The reference shows the built-in defaults, whatever the environment says.
	clearTestEnv(t)
	t.Setenv("LETHE_TEST_LEASE", "5s")
	var s settings
	ref := daemon.Reference(testFlags(&s), map[string]string{"nats-url": "the machine's"})
	want := "| key / flag | environment | type | default | description |\n" +
		"|---|---|---|---|---|\n" +
		"| `--config` (not in the file) | `LETHE_TEST_CONFIG` | string | — | configuration file |\n" +
		"| `dev` | `LETHE_TEST_DEV` | bool | `false` | development mode |\n" +
		"| `--export` (command line only) | — | string | — | write something and exit |\n" +
		"| `lease` | `LETHE_TEST_LEASE` | duration | `1m0s` | lease |\n" +
		"| `nats-url` | `LETHE_TEST_NATS_URL` | string | the machine's | NATS URL |\n" +
		"| `streams` | `LETHE_TEST_STREAMS` | int | `4` | streams (0: 4) |\n" +
		"| `trust-roots` | `LETHE_TEST_ROOTS` | list | — | roots; repeatable (a path list) |\n"
	if diff := cmp.Diff(want, ref); diff != "" {
		t.Errorf("Reference (-want +got):\n%s", diff)
	}

	doc := []byte("# Title\n<!-- BEGIN x -->\nold\n<!-- END x -->\ntail\n")
	got, err := daemon.ReplaceSection(doc, "x", "new\n")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff("# Title\n<!-- BEGIN x -->\nnew\n<!-- END x -->\ntail\n", string(got)); diff != "" {
		t.Errorf("ReplaceSection (-want +got):\n%s", diff)
	}
	if _, err := daemon.ReplaceSection(doc, "y", ""); err == nil {
		t.Error("ReplaceSection without markers succeeded")
	}
}

// TestStartError: --help is a success (its usage was printed); any other error is reported
// after the daemon's name, with status 2.
func TestStartError(t *testing.T) {
	var b bytes.Buffer
	if code := daemon.StartError(&b, "lethe-x", fmt.Errorf("parsing: %w", flag.ErrHelp)); code != 0 || b.Len() != 0 {
		t.Errorf("--help: status %d, printed %q; want 0 and nothing more", code, b.String())
	}
	if code := daemon.StartError(&b, "lethe-x", errors.New("--nats-url is required")); code != 2 || b.String() != "lethe-x: --nats-url is required\n" {
		t.Errorf("a bad setting: status %d, printed %q", code, b.String())
	}
}
