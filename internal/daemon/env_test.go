package daemon_test

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/daemon"
)

// namespacedFlags declares settings under the old shared names, then moves them under
// LETHE_TEST_, as the broker and the keybroker do.
func namespacedFlags(url, lease, password *string) *daemon.Flags {
	fs := daemon.NewFlags("lethe-test")
	fs.SetOutput(io.Discard)
	fs.String(url, "nats-url", "LETHE_NATS_URL", "nats://default:4222", "NATS URL")
	fs.String(lease, "lease", "LETHE_LEASE", "60s", "lease")
	fs.Secret(password, "password", "LETHE_NATS_PASSWORD", "NATS password")
	fs.Namespace("LETHE_TEST_", "LETHE_NATS_URL")
	return fs
}

func TestNamespaceAliases(t *testing.T) {
	for _, k := range []string{"LETHE_NATS_URL", "LETHE_LEASE", "LETHE_NATS_PASSWORD", "LETHE_TEST_NATS_URL", "LETHE_TEST_LEASE", "LETHE_TEST_NATS_PASSWORD", "LETHE_TEST_NATS_PASSWORD_FILE"} {
		t.Setenv(k, "")
	}
	tests := map[string]struct {
		env          map[string]string
		url, lease   string
		deprecations []string
	}{
		"new names": {
			env: map[string]string{"LETHE_TEST_NATS_URL": "nats://new:1", "LETHE_TEST_LEASE": "5s"},
			url: "nats://new:1", lease: "5s",
		},
		"old name, with a warning": {
			env: map[string]string{"LETHE_LEASE": "7s"},
			url: "nats://default:4222", lease: "7s",
			deprecations: []string{"environment variable LETHE_LEASE is deprecated: use LETHE_TEST_LEASE"},
		},
		"new name wins over the old": {
			env: map[string]string{"LETHE_LEASE": "7s", "LETHE_TEST_LEASE": "9s"},
			url: "nats://default:4222", lease: "9s",
		},
		"retired name is not read": {
			env: map[string]string{"LETHE_NATS_URL": "nats://lethectl:1"},
			url: "nats://default:4222", lease: "60s",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var url, lease, password string
			fs := namespacedFlags(&url, &lease, &password)
			if err := fs.Parse(nil); err != nil {
				t.Fatal(err)
			}
			if url != tc.url || lease != tc.lease {
				t.Errorf("nats-url, lease = %q, %q; want %q, %q", url, lease, tc.url, tc.lease)
			}
			if diff := cmp.Diff(tc.deprecations, fs.Deprecations()); diff != "" {
				t.Errorf("Deprecations (-want +got):\n%s", diff)
			}
			if got, want := fs.IsSet("lease"), tc.lease != "60s"; got != want {
				t.Errorf("IsSet(lease) = %v, want %v", got, want)
			}
		})
	}
	var url, lease, password string
	fs := namespacedFlags(&url, &lease, &password)
	if got := fs.EnvVar("lease"); got != "LETHE_TEST_LEASE" {
		t.Errorf("EnvVar(lease) = %q, want LETHE_TEST_LEASE", got)
	}
	if diff := cmp.Diff([]string{"LETHE_LEASE"}, fs.Aliases("lease")); diff != "" {
		t.Errorf("Aliases(lease) (-want +got):\n%s", diff)
	}
	ref := daemon.Reference(fs, nil)
	for _, want := range []string{"`LETHE_TEST_LEASE` (formerly `LETHE_LEASE`)", "`LETHE_TEST_NATS_PASSWORD` or `LETHE_TEST_NATS_PASSWORD_FILE` (formerly `LETHE_NATS_PASSWORD`)", "| `LETHE_TEST_NATS_URL` |"} {
		if !strings.Contains(ref, want) {
			t.Errorf("Reference lacks %q:\n%s", want, ref)
		}
	}
}

func TestSecretFile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "password")
	if err := os.WriteFile(file, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		env     map[string]string
		want    string
		wantErr string
	}{
		"from the file, without its newline": {env: map[string]string{"LETHE_TEST_NATS_PASSWORD_FILE": file}, want: "s3cret"},
		"from the variable":                  {env: map[string]string{"LETHE_TEST_NATS_PASSWORD": "plain"}, want: "plain"},
		"both":                               {env: map[string]string{"LETHE_TEST_NATS_PASSWORD": "plain", "LETHE_TEST_NATS_PASSWORD_FILE": file}, wantErr: "LETHE_TEST_NATS_PASSWORD and LETHE_TEST_NATS_PASSWORD_FILE are both set"},
		"missing file":                       {env: map[string]string{"LETHE_TEST_NATS_PASSWORD_FILE": filepath.Join(dir, "none")}, wantErr: "LETHE_TEST_NATS_PASSWORD_FILE: reading the secret"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			for _, k := range []string{"LETHE_NATS_PASSWORD", "LETHE_TEST_NATS_PASSWORD", "LETHE_TEST_NATS_PASSWORD_FILE"} {
				t.Setenv(k, tc.env[k])
			}
			var url, lease, password string
			fs := namespacedFlags(&url, &lease, &password)
			err := fs.Parse(nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Parse = %v, want an error containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "plain") {
					t.Errorf("the error shows the secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if password != tc.want {
				t.Errorf("password = %q, want %q", password, tc.want)
			}
		})
	}
}
