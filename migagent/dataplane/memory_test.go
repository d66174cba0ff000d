package dataplane

import (
	"testing"
)

func TestRegionClean(t *testing.T) {
	const size = 1 << 20
	for name, tc := range map[string]struct {
		prepare      func(r *Region)
		wantScrubbed bool
	}{
		"fresh is only read back":       {prepare: func(*Region) {}},
		"fresh but written is scrubbed": {prepare: func(r *Region) { r.Page(7)[9] = 1 }, wantScrubbed: true},
		"already scrubbed is scrubbed again": {prepare: func(r *Region) {
			if _, err := r.Scrub(); err != nil {
				t.Fatal(err)
			}
		}, wantScrubbed: true},
	} {
		t.Run(name, func(t *testing.T) {
			r := testRegion(t, size)
			tc.prepare(r)
			n, scrubbed, err := r.Clean()
			if err != nil || n != size || scrubbed != tc.wantScrubbed {
				t.Errorf("Clean() = %d, %v, %v; want %d, %v, nil", n, scrubbed, err, size, tc.wantScrubbed)
			}
			if !isZeroRegion(r) {
				t.Error("region not zero after Clean")
			}
		})
	}
}
