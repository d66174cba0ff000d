package attest_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/attest"
)

var (
	_ attest.Attester = (*attest.SNPAttester)(nil)
	_ attest.Attester = (*attest.TDXAttester)(nil)
)

func TestDetect(t *testing.T) {
	a, err := attest.Detect()
	if err == nil {
		// On confidential hardware: the attester must name a real platform and produce bytes.
		if a.Platform().Emulated() {
			t.Fatalf("Detect returned emulated platform %v", a.Platform())
		}
		raw, err := a.Attest(t.Context(), [attest.ReportDataSize]byte{1})
		if err != nil {
			t.Fatalf("Attest on detected %v: %v", a.Platform(), err)
		}
		if len(raw) == 0 {
			t.Fatalf("Attest on detected %v returned no bytes", a.Platform())
		}
		return
	}
	if !errors.Is(err, attest.ErrNoTEE) {
		t.Errorf("Detect error %v does not wrap ErrNoTEE", err)
	}
	for _, want := range []string{"/sys/kernel/config/tsm/report", "/dev/sev-guest", "/dev/tdx_guest"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Detect error %q does not name %s", err, want)
		}
	}
}
