package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/policy"
)

// TestReadPrefilterMinimumTCB: the pre-filter carries the destination's minimum TCB of each
// platform, which an evacuation's dry run compares with the TCB every guest's host reports.
func TestReadPrefilterMinimumTCB(t *testing.T) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	const head = "apiVersion: lethe.dev/v1\nkind: MigrationPolicy\nmetadata:\n  tenant: acme\n  name: db\n  policySvn: 1\n"
	svn := strings.Repeat("03", 16)
	for name, tt := range map[string]struct {
		spec string
		want *attest.HostTCB
	}{
		"none": {"", nil},
		"snp": {"spec:\n  destination:\n    snp:\n      minimumTcb: {bl: 3, tee: 0, snp: 8, ucode: 115}\n",
			&attest.HostTCB{SNP: &attest.SNPTCB{BootLoader: 3, SNP: 8, Microcode: 115}}},
		"tdx": {"spec:\n  destination:\n    tdx:\n      minimumTeeTcbSvn: " + svn + "\n",
			&attest.HostTCB{TDX: attest.HexBytes(strings.Repeat("\x03", 16))}},
	} {
		t.Run(name, func(t *testing.T) {
			env, err := policy.Sign("p.yaml", []byte(head+tt.spec), key)
			if err != nil {
				t.Fatal(err)
			}
			raw, err := env.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			pf, err := readPrefilter(raw)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, pf.MinimumTCB); diff != "" {
				t.Errorf("minimum TCB (-want +got):\n%s", diff)
			}
		})
	}
}
