package main

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent"
)

func TestParseFlags(t *testing.T) {
	tests := map[string]struct {
		args    []string
		wantErr string
		check   func(*testing.T, *config)
	}{
		"emulated needs allow-emulated": {
			args:    []string{"--host", "h1", "--dev", "--attestation", "emulated-sev-snp", "--emulator-dir", "/tmp/x"},
			wantErr: "--allow-emulated",
		},
		"emulated needs a directory": {
			args:    []string{"--host", "h1", "--dev", "--attestation", "emulated-sev-snp", "--allow-emulated"},
			wantErr: "--emulator-dir",
		},
		"no NATS auth without dev": {
			args:    []string{"--host", "h1"},
			wantErr: "NATS authentication",
		},
		"bad host": {
			args:    []string{"--host", "h.1", "--dev"},
			wantErr: "--host",
		},
		"unknown attestation": {
			args:    []string{"--host", "h1", "--dev", "--attestation", "sgx"},
			wantErr: "--attestation",
		},
		"bad log format": {
			args:    []string{"--host", "h1", "--dev", "--log-format", "xml"},
			wantErr: "log format",
		},
		"bad log level": {
			args:    []string{"--host", "h1", "--dev", "--log-level", "loud"},
			wantErr: "log level",
		},
		"full emulated": {
			args: []string{"--host", "h1", "--dev", "--attestation", "emulated-sev-snp", "--allow-emulated",
				"--emulator-dir", "/tmp/emu", "--emulated-tcb", "bl=3,tee=0,snp=8,ucode=115",
				"--guest", "acme/web=256MiB", "--guest", "acme/db=1GiB", "--labels", "zone=a,tier=gold"},
			check: func(t *testing.T, c *config) {
				want := []migagent.GuestSpec{{Tenant: "acme", VM: "web", MemoryBytes: 256 << 20}, {Tenant: "acme", VM: "db", MemoryBytes: 1 << 30}}
				if diff := cmp.Diff(want, c.guests); diff != "" {
					t.Errorf("guests (-want +got):\n%s", diff)
				}
				if diff := cmp.Diff(map[string]string{"zone": "a", "tier": "gold"}, c.labels); diff != "" {
					t.Errorf("labels (-want +got):\n%s", diff)
				}
				opts, err := emulatedOptions(c)
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(&attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115}, opts.TCB); diff != "" {
					t.Errorf("tcb (-want +got):\n%s", diff)
				}
				other := *c
				other.host = "h2"
				o2, _ := emulatedOptions(&other)
				if len(opts.ChipID) != 64 || string(opts.ChipID) == string(o2.ChipID) {
					t.Error("chip IDs not derived per host")
				}
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c, err := parseFlags(tc.args)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
		})
	}
}

func TestParseTCB(t *testing.T) {
	for _, bad := range []string{"bl=3,x=1", "bl=300", "bl", "ucode=-1"} {
		if _, err := parseTCB(bad); err == nil {
			t.Errorf("parseTCB(%q) accepted", bad)
		}
	}
}
