package deploy

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestMetricNames(t *testing.T) {
	for name, tc := range map[string]struct {
		expr string
		want []string
	}{
		"selector": {`lethe_broker_migrations{phase!="Requested"}`, []string{"lethe_broker_migrations"}},
		"aggregation and range": {
			`sum by (le, phase) (rate(lethe_broker_phase_duration_seconds_bucket[15m]))`,
			[]string{"lethe_broker_phase_duration_seconds_bucket"},
		},
		"binary with keywords": {
			"sum(a_total) / on (job) group_left (instance) sum(b) > bool 0.5\nand c unless d offset 5m",
			[]string{"a_total", "b", "c", "d"},
		},
		"label values that look like names": {`up{job="lethe-agent", op=~"kv_read|publish"} == 0`, []string{"up"}},
		"number and vector": {`count(x == 0) or vector(1e3)`, []string{"x"}},
		"string with brace": {`label_replace(m, "dst", "{x}", "src", "(.*)")`, []string{"m"}},
	} {
		t.Run(name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, MetricNames(tc.expr)); diff != "" {
				t.Errorf("MetricNames(%q) (-want +got):\n%s", tc.expr, diff)
			}
		})
	}
}

// TestKitMetricsHaveOwners checks that each metric the kit uses is exported by a daemon (whose
// tests check that it has it) or by Prometheus itself.
func TestKitMetricsHaveOwners(t *testing.T) {
	uses, err := Uses()
	if err != nil {
		t.Fatal(err)
	}
	if len(uses) == 0 {
		t.Fatal("the kit uses no metric")
	}
	for name, where := range uses {
		if OwnerOf(name) == "" {
			t.Errorf("%s (used by %s) is no daemon's metric", name, strings.Join(where, ", "))
		}
	}
}

func TestAlertRulesCoverIssue(t *testing.T) {
	rf, err := ParseRules("lethe-alerts.yaml", AlertRules)
	if err != nil {
		t.Fatal(err)
	}
	uses := map[string]bool{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			for _, n := range MetricNames(r.Expr) {
				uses[n] = true
			}
		}
	}
	// What the alerts must watch: stuck migrations, the destruction backlog, Vault and NATS
	// errors, the denial rate, hosts lost, downtime over the limit and fleet operations.
	for _, n := range []string{
		"lethe_broker_migrations", "lethe_keybroker_destruction_backlog", "lethe_keybroker_vault_errors_total",
		"lethe_nats_errors_total", "lethe_keybroker_decisions_total", "up", "lethe_migration_downtime_seconds_bucket",
		"lethe_fleet_guests", "lethe_fleet_guests_total",
	} {
		if !uses[n] {
			t.Errorf("no alert uses %s", n)
		}
	}
}

func TestParseRulesRefuses(t *testing.T) {
	for name, doc := range map[string]string{
		"unknown field": "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n    labels: {severity: warning}\n    annotations: {summary: s}\n    severity: warning\n",
		"no severity":   "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n    annotations: {summary: s}\n",
		"no expr":       "groups:\n- name: g\n  rules:\n  - alert: A\n    labels: {severity: warning}\n    annotations: {summary: s}\n",
		"repeated":      "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    labels: {severity: warning}\n    annotations: {summary: s}\n  - alert: A\n    expr: up\n    labels: {severity: warning}\n    annotations: {summary: s}\n",
		"bad for":       "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    for: soon\n    labels: {severity: warning}\n    annotations: {summary: s}\n",
		"no groups":     "groups: []\n",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseRules(name, []byte(doc)); err == nil {
				t.Error("ParseRules accepted it")
			}
		})
	}
}
