package daemon_test

import (
	"errors"
	"flag"
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

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// testFlags defines flags the way the daemons do: the environment variable is read into the
// default and named in the usage.
func testFlags(s *settings) *flag.FlagSet {
	fs := flag.NewFlagSet("lethe-test", flag.ContinueOnError)
	fs.SetOutput(discard{})
	fs.String("config", env("LETHE_TEST_CONFIG", ""), "configuration file (env LETHE_TEST_CONFIG)")
	fs.StringVar(&s.URL, "nats-url", env("LETHE_TEST_NATS_URL", "nats://default:4222"), "NATS URL (env LETHE_TEST_NATS_URL)")
	lease, _ := time.ParseDuration(env("LETHE_TEST_LEASE", "60s"))
	fs.DurationVar(&s.Lease, "lease", lease, "lease (env LETHE_TEST_LEASE)")
	fs.IntVar(&s.Streams, "streams", 4, "streams (env LETHE_TEST_STREAMS; 0: 4)")
	fs.BoolVar(&s.Dev, "dev", env("LETHE_TEST_DEV", "") == "true", "development mode (env LETHE_TEST_DEV)")
	fs.Var((*listValue)(&s.Roots), "trust-roots", "roots; repeatable (env LETHE_TEST_ROOTS, a path list)")
	fs.StringVar(&s.Export, "export", "", "write something and exit")
	return fs
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

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
		"quoted and hex scalars": {
			file: "nats-url: \"nats://quoted:4222\"\nstreams: 0x10\n",
			want: settings{URL: "nats://quoted:4222", Lease: 60 * time.Second, Streams: 16},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			for _, k := range []string{"LETHE_TEST_CONFIG", "LETHE_TEST_NATS_URL", "LETHE_TEST_LEASE", "LETHE_TEST_DEV", "LETHE_TEST_ROOTS", "LETHE_TEST_STREAMS"} {
				t.Setenv(k, "")
			}
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			args := tc.args
			if tc.file != "" {
				args = append([]string{"--config", writeFile(t, tc.file)}, args...)
			}
			var got settings
			if err := daemon.Parse(testFlags(&got), args); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("settings (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseConfigFromEnvironment(t *testing.T) {
	t.Setenv("LETHE_TEST_CONFIG", writeFile(t, "streams: 2\n"))
	var got settings
	if err := daemon.Parse(testFlags(&got), nil); err != nil {
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
			want: []string{`:1:11: nats-url: expected a plain value, got an anchor (anchors, aliases and tags are not allowed)`, `:2:10: streams: expected a plain value, got an alias (anchors, aliases and tags are not allowed)`},
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
			t.Setenv("LETHE_TEST_CONFIG", "")
			path := writeFile(t, tc.file)
			var got settings
			err := daemon.Parse(testFlags(&got), []string{"--config", path})
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
	t.Setenv("LETHE_TEST_CONFIG", "")
	var s settings
	err := daemon.Parse(testFlags(&s), []string{"--config", filepath.Join(t.TempDir(), "none.yaml")})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("err = %v, want one wrapping os.ErrNotExist", err)
	}
}

func TestEnvVarAndDescription(t *testing.T) {
	var s settings
	fs := testFlags(&s)
	tests := map[string]struct{ env, desc string }{
		"nats-url":    {"LETHE_TEST_NATS_URL", "NATS URL"},
		"streams":     {"LETHE_TEST_STREAMS", "streams (0: 4)"},
		"trust-roots": {"LETHE_TEST_ROOTS", "roots; repeatable (a path list)"},
		"export":      {"", "write something and exit"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			f := fs.Lookup(name)
			if got := daemon.EnvVar(f); got != tc.env {
				t.Errorf("EnvVar = %q, want %q", got, tc.env)
			}
			if got := daemon.Description(f); got != tc.desc {
				t.Errorf("Description = %q, want %q", got, tc.desc)
			}
		})
	}
}

func TestReferenceAndReplaceSection(t *testing.T) {
	for _, k := range []string{"LETHE_TEST_CONFIG", "LETHE_TEST_NATS_URL", "LETHE_TEST_LEASE", "LETHE_TEST_DEV"} {
		t.Setenv(k, "")
	}
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
