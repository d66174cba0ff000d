package agentapi

import (
	"testing"
	"time"
)

func TestDowntimeLimit(t *testing.T) {
	const ms = time.Millisecond
	tests := map[string]struct {
		operator, tenant, want time.Duration
	}{
		"tenant lowers":        {operator: 300 * ms, tenant: 100 * ms, want: 100 * ms},
		"tenant cannot raise":  {operator: 300 * ms, tenant: 2000 * ms, want: 300 * ms},
		"tenant sets none":     {operator: 300 * ms, tenant: 0, want: 300 * ms},
		"operator sets none":   {operator: 0, tenant: 50 * ms, want: 50 * ms},
		"neither sets one":     {},
		"negative is no limit": {operator: -ms, tenant: 0, want: 0},
		"equal limits":         {operator: 300 * ms, tenant: 300 * ms, want: 300 * ms},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := DowntimeLimit(tc.operator, tc.tenant); got != tc.want {
				t.Errorf("DowntimeLimit(%v, %v) = %v, want %v", tc.operator, tc.tenant, got, tc.want)
			}
		})
	}
}
