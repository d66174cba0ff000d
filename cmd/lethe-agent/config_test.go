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
	daemontest.CheckReference(t, "lethe-agent", newFlagSet(&config{}), map[string]string{"host": "the short host name"}, *update)
}

func TestExampleConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	c, err := parseFlags([]string{"--config", "../../deploy/lethe-agent.yaml"})
	if err != nil {
		t.Fatal(err)
	}
	type view struct {
		Host, Attestation, DataListen, NKey, TLSCert, Metrics, LogFormat string
		Labels                                                           map[string]string
		AllowEmulated                                                    bool
		Heartbeat                                                        time.Duration
	}
	got := view{c.host, c.attestation, c.dataListen, c.nats.NKeySeed, c.nats.TLS.Cert, c.metricsListen, c.logFormat, c.labels, c.allowEmulated, c.heartbeat}
	want := view{
		Host: "host-a", Attestation: "auto", DataListen: "10.20.0.11:0",
		NKey: "/run/credentials/lethe-agent.service/nats.nk", TLSCert: "/etc/lethe/tls/host-a.crt",
		Metrics: "127.0.0.1:9472", LogFormat: "json",
		Labels:    map[string]string{"zone": "a", "tier": "gold"},
		Heartbeat: 5 * time.Second,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("settings (-want +got):\n%s", diff)
	}
}

func TestConfigCannotSneakEmulation(t *testing.T) {
	daemontest.ClearEnv(t)
	path := t.TempDir() + "/agent.yaml"
	if err := os.WriteFile(path, []byte("host: h1\ndev: true\nattestation: emulated-sev-snp\nemulator-dir: /tmp/emu\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := parseFlags([]string{"--config", path}); err == nil || !strings.Contains(err.Error(), "--allow-emulated") {
		t.Errorf("err = %v, want emulated attestation refused without allow-emulated", err)
	}
}

func TestEveryFlagIsASetting(t *testing.T) {
	daemontest.CheckEveryFlagIsASetting(t, newFlagSet(&config{}))
}

// TestDevConfig loads the development example that make demo starts the daemon from.
func TestDevConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	if _, err := parseFlags([]string{"--config", "../../deploy/dev/lethe-agent.yaml", "--host", "host-a"}); err != nil {
		t.Fatal(err)
	}
}
