package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestConfigFileStrict(t *testing.T) {
	tests := map[string]struct {
		text     string
		want     configFile
		wantErr  []string
		wantWarn string
	}{
		"flag names": {
			text: "nats-url: nats://10.0.0.1:4222\ntenant: acme\ncreds: /etc/lethe/op.creds\n",
			want: configFile{NATSURL: "nats://10.0.0.1:4222", Tenant: "acme", Creds: "/etc/lethe/op.creds"},
		},
		"JSON, the former format": {
			text:     `{"natsUrl": "nats://10.0.0.1:4222", "tenant": "acme"}`,
			want:     configFile{NATSURL: "nats://10.0.0.1:4222", LegacyNATSURL: "nats://10.0.0.1:4222", Tenant: "acme"},
			wantWarn: "key natsUrl is deprecated: use nats-url",
		},
		"unknown key, with its position": {
			text:    "nats-url: nats://10.0.0.1:4222\ntenat: acme\n",
			wantErr: []string{"lethectl.yaml:2:1", "tenat"},
		},
		"duplicate key":     {text: "tenant: a\ntenant: b\n", wantErr: []string{"lethectl.yaml:2:1", "tenant"}},
		"not a mapping":     {text: "- nats-url\n", wantErr: []string{"expected a mapping of flag names"}},
		"both URL keys":     {text: "nats-url: nats://a:1\nnatsUrl: nats://b:1\n", wantErr: []string{"the former name of nats-url"}},
		"a list for a name": {text: "tenant: [a, b]\n", wantErr: []string{"lethectl.yaml:1:9", "tenant"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "lethectl.yaml")
			if err := os.WriteFile(path, []byte(tc.text), 0o600); err != nil {
				t.Fatal(err)
			}
			var warn bytes.Buffer
			got, err := readConfigFile(path, true, &warn)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("readConfigFile = %+v, want an error", got)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q lacks %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
			if !strings.Contains(warn.String(), tc.wantWarn) {
				t.Errorf("warnings %q lack %q", warn.String(), tc.wantWarn)
			}
		})
	}
}

func TestConfigFileAbsent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "none.yaml")
	if _, err := readConfigFile(path, false, &bytes.Buffer{}); err != nil {
		t.Errorf("absent default file: %v, want no error", err)
	}
	if _, err := readConfigFile(path, true, &bytes.Buffer{}); err == nil {
		t.Error("absent named file: no error, want one")
	}
}

// TestResolveSettings checks the precedence flag > environment > file and the password's
// _FILE variable.
func TestResolveSettings(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "lethectl.yaml")
	if err := os.WriteFile(cfg, []byte("nats-url: nats://file:1\ntenant: file-tenant\nuser: file-user\npassword: file-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte("env-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"LETHECTL_CONFIG", "LETHE_NATS_URL", "LETHE_NATS_CREDS", "LETHE_NATS_USER", "LETHE_NATS_PASSWORD"} {
		t.Setenv(k, "")
	}
	t.Setenv("LETHE_CONFIG", cfg)
	t.Setenv("LETHE_TENANT", "env-tenant")
	t.Setenv("LETHE_NATS_PASSWORD_FILE", pw)
	o := brokerOpts{URL: "nats://flag:1", output: "text"}
	if err := o.resolve(); err != nil {
		t.Fatal(err)
	}
	got := []string{o.URL, o.Tenant, o.User, o.Password}
	want := []string{"nats://flag:1", "env-tenant", "file-user", "env-pw"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("url, tenant, user, password (-want +got):\n%s", diff)
	}
}
