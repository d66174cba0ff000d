package migagent

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/keybroker/grant"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
	"github.com/lethe-cc/lethe/migagent/libvirt"
)

func TestSourceSettings(t *testing.T) {
	const ms = time.Millisecond
	tests := map[string]struct {
		agent libvirt.Settings
		limit time.Duration
		want  libvirt.Settings
	}{
		"no limit keeps the agent's": {agent: libvirt.Settings{MaxDowntime: 300 * ms}, want: libvirt.Settings{MaxDowntime: 300 * ms}},
		"a lower limit wins":         {agent: libvirt.Settings{MaxDowntime: 300 * ms}, limit: 100 * ms, want: libvirt.Settings{MaxDowntime: 100 * ms, AutoConverge: true}},
		"a higher limit does not":    {agent: libvirt.Settings{MaxDowntime: 300 * ms}, limit: time.Second, want: libvirt.Settings{MaxDowntime: 300 * ms, AutoConverge: true}},
		"the agent sets none":        {agent: libvirt.Settings{PostCopy: true}, limit: 50 * ms, want: libvirt.Settings{MaxDowntime: 50 * ms, AutoConverge: true, PostCopy: true}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, sourceSettings(tc.agent, tc.limit)); diff != "" {
				t.Errorf("settings (-want +got):\n%s", diff)
			}
		})
	}
}

// TestTransferSettings: the broker's downtime limit is held to the tenant's, as the
// keybroker signed it in the grant (a broker that asks for no limit, or a looser one, gets
// the tenant's); post-copy needs the operator's setting and the tenant's policy both.
func TestTransferSettings(t *testing.T) {
	const ms = time.Millisecond
	agent := libvirt.Settings{MaxDowntime: 2000 * ms, PostCopy: true, Parallel: 2}
	tests := map[string]struct {
		agent libvirt.Settings
		req   time.Duration
		grant *grant.Grant
		want  libvirt.Settings
	}{
		"no limits":                        {agent: agent, grant: &grant.Grant{}, want: libvirt.Settings{MaxDowntime: 2000 * ms, Parallel: 2}},
		"the broker's limit":               {agent: agent, req: 500 * ms, grant: &grant.Grant{}, want: libvirt.Settings{MaxDowntime: 500 * ms, AutoConverge: true, Parallel: 2}},
		"a broker that drops the tenant's": {agent: agent, grant: &grant.Grant{MaxDowntime: 100 * ms}, want: libvirt.Settings{MaxDowntime: 100 * ms, AutoConverge: true, Parallel: 2}},
		"a broker looser than the tenant":  {agent: agent, req: time.Second, grant: &grant.Grant{MaxDowntime: 100 * ms}, want: libvirt.Settings{MaxDowntime: 100 * ms, AutoConverge: true, Parallel: 2}},
		"a broker tighter than the tenant": {agent: agent, req: 50 * ms, grant: &grant.Grant{MaxDowntime: 100 * ms}, want: libvirt.Settings{MaxDowntime: 50 * ms, AutoConverge: true, Parallel: 2}},
		"post-copy, both allow":            {agent: agent, grant: &grant.Grant{PostCopy: true}, want: libvirt.Settings{MaxDowntime: 2000 * ms, PostCopy: true, Parallel: 2}},
		"post-copy, the tenant does not":   {agent: agent, grant: &grant.Grant{}, want: libvirt.Settings{MaxDowntime: 2000 * ms, Parallel: 2}},
		"post-copy, the operator does not": {agent: libvirt.Settings{}, grant: &grant.Grant{PostCopy: true}, want: libvirt.Settings{}},
		"no grant":                         {agent: agent, req: 50 * ms, want: libvirt.Settings{MaxDowntime: 50 * ms, AutoConverge: true, Parallel: 2}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, transferSettings(tc.agent, tc.req, tc.grant)); diff != "" {
				t.Errorf("settings (-want +got):\n%s", diff)
			}
		})
	}
}

func TestTransferLog(t *testing.T) {
	tl := &transferLog{}
	tl.round(dataplane.Progress{Round: 0, Pages: 256, Bytes: 1 << 20, DirtyRate: 10, Rate: 1 << 30, Dirty: 4})
	tl.round(dataplane.Progress{Round: 1, Final: true, Pages: 4, Bytes: 4 * dataplane.PageSize, Rate: 1 << 24, Throttle: 20})
	want := []agentapi.RoundStats{
		{Round: 1, Pages: 256, Bytes: 1 << 20, DirtyRate: 10 * dataplane.PageSize, Throughput: 1 << 30, Duration: time.Second / 1024},
		{Round: 2, Final: true, Pages: 4, Bytes: 4 * dataplane.PageSize, Throughput: 1 << 24, Duration: time.Second / 1024, Throttle: 20},
	}
	if diff := cmp.Diff(want, tl.rounds); diff != "" {
		t.Errorf("rounds (-want +got):\n%s", diff)
	}
}

// TestLibvirtRounds checks the rounds a libvirt source reports: libvirt's job statistics
// count bytes over all iterations, and a round is what they moved while one iteration held.
func TestLibvirtRounds(t *testing.T) {
	const mib = 1 << 20
	d := &sourceDriver{}
	for _, s := range []libvirt.Progress{
		{Iteration: 1, DataProcessed: 10 * mib, MemoryBandwidth: 100 * mib},
		{Iteration: 1, DataProcessed: 60 * mib, MemoryBandwidth: 100 * mib},
		{Iteration: 2, DataProcessed: 70 * mib, MemoryBandwidth: 50 * mib, DirtyRate: 256, PageSize: 4096},
	} {
		d.stats = s
		d.round(false)
	}
	d.stats = libvirt.Progress{Iteration: 2, DataProcessed: 72 * mib, MemoryBandwidth: 40 * mib, Downtime: 30 * time.Millisecond, AutoConvergeThrottle: 30}
	d.round(true)
	want := []agentapi.RoundStats{
		{Round: 1, Pages: 60 * mib / dataplane.PageSize, Bytes: 60 * mib, Throughput: 100 * mib, Duration: 600 * time.Millisecond},
		{Round: 2, Final: true, Pages: 12 * mib / dataplane.PageSize, Bytes: 12 * mib, Throughput: 40 * mib, Duration: 300 * time.Millisecond, Throttle: 30},
	}
	if diff := cmp.Diff(want, d.rounds); diff != "" {
		t.Errorf("rounds (-want +got):\n%s", diff)
	}
}
