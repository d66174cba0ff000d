package main

import (
	"flag"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
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
