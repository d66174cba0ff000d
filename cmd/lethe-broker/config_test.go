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
	t.Setenv("LETHE_REPLICAS", "5")
	c, err := parseFlags([]string{"--config", "../../deploy/lethe-broker.yaml", "--id", "broker-9"})
	if err != nil {
		t.Fatal(err)
	}
	if c.id != "broker-9" || c.replicas != 5 || c.streams != 4 {
		t.Errorf("id %q, replicas %d, streams %d: want broker-9 (flag), 5 (environment), 4 (file)", c.id, c.replicas, c.streams)
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
