package main

import (
	"flag"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/daemon/daemontest"
)

var update = flag.Bool("update", false, "rewrite docs/configuration.md and deploy/nats-server.conf")

func TestConfigurationReference(t *testing.T) {
	daemontest.ClearEnv(t)
	daemontest.CheckReference(t, "lethe-broker", newFlagSet(&config{}), nil, *update)
}

func TestExampleConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	c, err := parseFlags([]string{"--config", "../../deploy/lethe-broker.yaml"})
	if err != nil {
		t.Fatal(err)
	}
	type view struct {
		URL, NKey, TLSCA, ID, LogFormat, Metrics string
		Replicas                                 int
		Lease                                    time.Duration
	}
	got := view{c.nats.URL, c.nats.NKeySeed, c.nats.TLS.CA, c.id, c.logFormat, c.metricsListen, c.replicas, c.lease}
	want := view{
		URL:   "tls://nats-1.lethe.internal:4222,tls://nats-2.lethe.internal:4222,tls://nats-3.lethe.internal:4222",
		NKey:  "/run/credentials/lethe-broker.service/nats.nk",
		TLSCA: "/etc/lethe/tls/ca.crt", ID: "broker-1", LogFormat: "json", Metrics: "127.0.0.1:9470",
		Replicas: 3, Lease: 60 * time.Second,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("settings (-want +got):\n%s", diff)
	}
}

func TestFlagsOverrideConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	t.Setenv("LETHE_BROKER_REPLICAS", "5")
	c, err := parseFlags([]string{"--config", "../../deploy/lethe-broker.yaml", "--id", "broker-9"})
	if err != nil {
		t.Fatal(err)
	}
	if c.id != "broker-9" || c.replicas != 5 || c.streams != 4 {
		t.Errorf("id %q, replicas %d, streams %d: want broker-9 (flag), 5 (environment), 4 (file)", c.id, c.replicas, c.streams)
	}
}

// TestDevSettings checks that the broker follows its own variables, not lethectl's
// LETHE_NATS_URL, and refuses an embedded server's settings beside --nats-url.
func TestDevSettings(t *testing.T) {
	tests := map[string]struct {
		args    []string
		env     map[string]string
		url     string
		listen  string
		wantErr string
	}{
		"lethectl's variable is not the broker's": {
			args: []string{"--dev", "--dev-listen", "127.0.0.1:5000"},
			env:  map[string]string{"LETHE_NATS_URL": "nats://127.0.0.1:4999"},
			url:  "", listen: "127.0.0.1:5000",
		},
		"the broker's own variable": {
			args: []string{"--dev"},
			env:  map[string]string{"LETHE_BROKER_NATS_URL": "nats://127.0.0.1:4999"},
			url:  "nats://127.0.0.1:4999", listen: "127.0.0.1:4222",
		},
		"the former dev variable still works": {
			args:   []string{"--dev"},
			env:    map[string]string{"LETHE_DEV_LISTEN": "127.0.0.1:5001"},
			listen: "127.0.0.1:5001",
		},
		"--dev-listen with --nats-url": {
			args:    []string{"--dev", "--nats-url", "nats://127.0.0.1:4999", "--dev-listen", "127.0.0.1:5000"},
			wantErr: "--dev-listen and --dev-store configure the embedded NATS server, which --nats-url replaces",
		},
		"--dev-listen from the environment with --nats-url": {
			args:    []string{"--dev", "--nats-url", "nats://127.0.0.1:4999"},
			env:     map[string]string{"LETHE_BROKER_DEV_LISTEN": "127.0.0.1:5000"},
			wantErr: "give one or the other",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			daemontest.ClearEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			c, err := parseFlags(tc.args)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseFlags = %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.nats.URL != tc.url || c.devListen != tc.listen {
				t.Errorf("nats-url %q, dev-listen %q; want %q, %q", c.nats.URL, c.devListen, tc.url, tc.listen)
			}
		})
	}
}

// TestDevServerBusyPort checks that a busy --dev-listen address is named as such.
func TestDevServerBusyPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := &config{dev: true, devListen: ln.Addr().String(), devStore: t.TempDir()}
	_, err = startDevServer(c, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("startDevServer on a busy port = %v, want an error saying the address is in use", err)
	}
}

func TestEveryFlagIsASetting(t *testing.T) {
	daemontest.CheckEveryFlagIsASetting(t, newFlagSet(&config{}))
}

func TestNATSServerConfigExample(t *testing.T) {
	data, err := os.ReadFile("../../deploy/nats-users.yaml")
	if err != nil {
		t.Fatal(err)
	}
	conf, err := renderNATSConfig("nats-users.yaml", data)
	if err != nil {
		t.Fatal(err)
	}
	const path = "../../deploy/nats-server.conf"
	if *update {
		if err := os.WriteFile(path, conf, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	committed, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(conf), string(committed)); diff != "" {
		t.Errorf("%s is out of date; run the test with -update (-generated +committed):\n%s", path, diff)
	}
}

func TestNATSConfigRefusesUnknownFields(t *testing.T) {
	_, err := renderNATSConfig("users.yaml", []byte("users:\n  - role: broker\n    nkey: UCDIX5VFG7X2NBT2ELIARQFOT7KE24PJRTQPB5VTVSI6AQWMNL7QBRNS\n    pasword: x\n"))
	if err == nil || !strings.Contains(err.Error(), "pasword") {
		t.Errorf("err = %v, want one naming the unknown field", err)
	}
}

// TestDevConfig loads the development example that make demo starts the daemon from.
func TestDevConfig(t *testing.T) {
	daemontest.ClearEnv(t)
	if _, err := parseFlags([]string{"--config", "../../deploy/dev/lethe-broker.yaml"}); err != nil {
		t.Fatal(err)
	}
}
