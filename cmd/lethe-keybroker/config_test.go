package main

import (
	"crypto/ed25519"
	"flag"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/tlog"
)

var update = flag.Bool("update", false, "rewrite docs/configuration.md")

func TestConfigurationReference(t *testing.T) {
	daemontest.ClearEnv(t)
	daemontest.CheckReference(t, "lethe-keybroker", newFlagSet(&config{}), nil, *update)
}

func TestExampleConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	c, err := parseFlags([]string{"--config", "../../deploy/lethe-keybroker.yaml"})
	if err != nil {
		t.Fatal(err)
	}
	type view struct {
		VaultAddr, VaultCA, RoleID, SecretIDFile, StateDir, NKey, Metrics string
		TrustRoots                                                        []string
		AllowEmulated                                                     bool
		NonceTTL                                                          time.Duration
	}
	got := view{c.vaultAddr, c.vaultCACert, c.roleID, c.secretIDFile, c.stateDir, c.nats.NKeySeed, c.metricsListen, c.trustRoots, c.allowEmulated, c.nonceTTL}
	want := view{
		VaultAddr: "https://vault.lethe.internal:8200", VaultCA: "/etc/lethe/tls/vault-ca.crt",
		RoleID:       "9f2d7c1e-4b1a-4d3e-9a57-2c0b8e6f1a42",
		SecretIDFile: "/run/credentials/lethe-keybroker.service/vault-secret-id",
		StateDir:     "/var/lib/lethe-keybroker", NKey: "/run/credentials/lethe-keybroker.service/nats.nk",
		Metrics:    "127.0.0.1:9471",
		TrustRoots: []string{"/etc/lethe/roots/sev-snp", "/etc/lethe/roots/tdx"},
		NonceTTL:   60 * time.Second,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("settings (-want +got):\n%s", diff)
	}
}

func TestExportPubIsCommandLineOnly(t *testing.T) {
	daemontest.ClearEnv(t)
	path := t.TempDir() + "/kb.yaml"
	if err := os.WriteFile(path, []byte("export-pub: /tmp/pub.pem\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := parseFlags([]string{"--config", path})
	if err == nil || !strings.Contains(err.Error(), path+":1:1: export-pub: command-line only") {
		t.Errorf("err = %v, want a positioned command-line-only error", err)
	}
}

func TestEveryFlagIsASetting(t *testing.T) {
	daemontest.CheckEveryFlagIsASetting(t, newFlagSet(&config{}), "export-pub")
}

// TestDevConfig loads the development example that make demo starts the daemon from.
func TestDevConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	if _, err := parseFlags([]string{"--config", "../../deploy/dev/lethe-keybroker.yaml"}); err != nil {
		t.Fatal(err)
	}
}

// TestLogSettings reads the residency log's origin and witnesses from the configuration file
// and the environment, and refuses an origin or a witness key the log could not use.
func TestLogSettings(t *testing.T) {
	var vkeys []string
	for _, name := range []string{"w1.example", "w2.example"} {
		_, priv, err := ed25519.GenerateKey(nil)
		if err != nil {
			t.Fatal(err)
		}
		w, err := tlog.NewWitnessSigner(name, priv, nil)
		if err != nil {
			t.Fatal(err)
		}
		vkeys = append(vkeys, w.VerifierKey())
	}
	base := []string{"--state-dir", t.TempDir(), "--dev"}
	type view struct {
		Origin    string
		Witnesses []string
	}
	for _, tc := range []struct {
		name, yaml string
		env        map[string]string
		args       []string
		want       view
		wantErr    string
	}{
		{name: "default", want: view{Origin: keybroker.DefaultLogOrigin}},
		{
			name: "yaml",
			yaml: "log-origin: kb.example.com/lethe\nlog-witness:\n  - " + vkeys[0] + "\n  - " + vkeys[1] + "\n",
			want: view{Origin: "kb.example.com/lethe", Witnesses: vkeys},
		},
		{
			name: "env over yaml",
			yaml: "log-origin: kb.example.com/lethe\n",
			env:  map[string]string{"LETHE_KEYBROKER_LOG_ORIGIN": "other/lethe", "LETHE_KEYBROKER_LOG_WITNESS": vkeys[0] + " " + vkeys[1]},
			want: view{Origin: "other/lethe", Witnesses: vkeys},
		},
		{name: "flags", args: []string{"--log-witness", vkeys[1]}, want: view{Origin: keybroker.DefaultLogOrigin, Witnesses: vkeys[1:]}},
		{name: "origin with a space", args: []string{"--log-origin", "my log"}, wantErr: "--log-origin"},
		{name: "bad witness key", args: []string{"--log-witness", "w1.example+0000+AAAA"}, wantErr: "--log-witness"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			daemontest.ClearEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			args := append([]string(nil), base...)
			if tc.yaml != "" {
				path := t.TempDir() + "/kb.yaml"
				if err := os.WriteFile(path, []byte(tc.yaml), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", path)
			}
			c, err := parseFlags(append(args, tc.args...))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, view{c.logOrigin, c.logWitnesses}); diff != "" {
				t.Errorf("log settings (-want +got):\n%s", diff)
			}
		})
	}
}

// TestMaxConcurrent: the NATS edge's limit of requests in flight defaults to one sized for
// fleets, is read from the environment, and must be positive.
func TestMaxConcurrent(t *testing.T) {
	base := []string{"--state-dir", t.TempDir(), "--dev"}
	for _, tc := range []struct {
		name    string
		env     map[string]string
		args    []string
		want    int
		wantErr bool
	}{
		{name: "default", want: natsapi.DefaultMaxConcurrent},
		{name: "env", env: map[string]string{"LETHE_KEYBROKER_MAX_CONCURRENT": "4096"}, want: 4096},
		{name: "flag", args: []string{"--max-concurrent", "256"}, want: 256},
		{name: "zero", args: []string{"--max-concurrent", "0"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			daemontest.ClearEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			c, err := parseFlags(append(append([]string(nil), base...), tc.args...))
			if tc.wantErr {
				if err == nil || !strings.Contains(err.Error(), "--max-concurrent") {
					t.Fatalf("err = %v, want one naming --max-concurrent", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.maxConcurrent != tc.want {
				t.Errorf("max concurrent = %d, want %d", c.maxConcurrent, tc.want)
			}
		})
	}
}
