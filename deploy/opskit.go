// Package deploy embeds Lethe's operations kit, the Grafana dashboard (grafana/lethe.json) and
// the Prometheus alert rules (prometheus/lethe-alerts.yaml), and reads them for the tests that
// keep the kit true: the rules file's structure, and the metric names the PromQL expressions of
// the rules and the panels use, which each daemon's tests look up in that daemon's registry.
//
// No daemon links this package; it must never import a daemon's package (cmd/lethe-*), whose
// tests import it. Its PromQL reading is a tokenizer, not a parser: it finds the metric names of
// the expressions Lethe ships and is not meant for arbitrary PromQL.
package deploy

import (
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lethe-cc/lethe/internal/strictyaml"
)

// Dashboard is the Grafana dashboard, grafana/lethe.json.
//
//go:embed grafana/lethe.json
var Dashboard []byte

// AlertRules is the Prometheus rules file, prometheus/lethe-alerts.yaml.
//
//go:embed prometheus/lethe-alerts.yaml
var AlertRules []byte

// RuleFile is a Prometheus rules file.
type RuleFile struct {
	Groups []RuleGroup `yaml:"groups"`
}

// RuleGroup is a named group of rules.
type RuleGroup struct {
	Name string `yaml:"name"`
	// Interval is how often the group is evaluated; zero means Prometheus's global interval.
	Interval time.Duration `yaml:"interval"`
	Rules    []Rule        `yaml:"rules"`
}

// Rule is an alerting rule (Lethe ships no recording rules).
type Rule struct {
	Alert string `yaml:"alert"`
	Expr  string `yaml:"expr"`
	// For is how long Expr must hold before the alert fires; zero means at once.
	For         time.Duration     `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// Severities are the values of an alert's severity label.
var Severities = []string{"warning", "critical"}

// ParseRules decodes a rules file strictly (an unknown field is an error) and checks what
// Prometheus and Lethe's operators rely on: at least one group, unique group and alert names,
// an expression in every rule, a severity label from Severities and a summary annotation.
func ParseRules(file string, data []byte) (*RuleFile, error) {
	doc, err := strictyaml.Parse(file, data)
	if err != nil {
		return nil, err
	}
	var rf RuleFile
	if _, err := doc.Decode(&rf, strictyaml.Options{}); err != nil {
		return nil, err
	}
	var errs []error
	if len(rf.Groups) == 0 {
		errs = append(errs, errors.New("no rule groups"))
	}
	groups, alerts := map[string]bool{}, map[string]bool{}
	for i, g := range rf.Groups {
		if g.Name == "" || groups[g.Name] {
			errs = append(errs, fmt.Errorf("group %d: missing or repeated name %q", i, g.Name))
		}
		groups[g.Name] = true
		if len(g.Rules) == 0 {
			errs = append(errs, fmt.Errorf("group %s: no rules", g.Name))
		}
		for j, r := range g.Rules {
			where := fmt.Sprintf("group %s rule %d (%s)", g.Name, j, r.Alert)
			if r.Alert == "" || alerts[r.Alert] {
				errs = append(errs, fmt.Errorf("%s: missing or repeated alert name", where))
			}
			alerts[r.Alert] = true
			if strings.TrimSpace(r.Expr) == "" {
				errs = append(errs, fmt.Errorf("%s: no expr", where))
			}
			if !slices.Contains(Severities, r.Labels["severity"]) {
				errs = append(errs, fmt.Errorf("%s: severity %q, want one of %v", where, r.Labels["severity"], Severities))
			}
			if r.Annotations["summary"] == "" {
				errs = append(errs, fmt.Errorf("%s: no summary annotation", where))
			}
		}
	}
	return &rf, errors.Join(errs...)
}

// Expression is a PromQL expression of the kit and where it is.
type Expression struct {
	// Where names the alert or the dashboard panel.
	Where string
	Expr  string
}

// dashboard is the part of a Grafana dashboard that holds queries.
type dashboard struct {
	Panels []panel `json:"panels"`
}

type panel struct {
	ID      int      `json:"id"`
	Type    string   `json:"type"`
	Title   string   `json:"title"`
	Targets []target `json:"targets"`
	Panels  []panel  `json:"panels"` // a collapsed row's
}

type target struct {
	Expr string `json:"expr"`
}

// Expressions returns every PromQL expression of the kit: the alert rules' and the dashboard
// panels'. It fails if either file does not parse, or if a dashboard panel other than a row
// has no query or panel ids repeat.
func Expressions() ([]Expression, error) {
	rf, err := ParseRules("prometheus/lethe-alerts.yaml", AlertRules)
	if err != nil {
		return nil, fmt.Errorf("reading the alert rules: %w", err)
	}
	var out []Expression
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			out = append(out, Expression{Where: "alert " + r.Alert, Expr: r.Expr})
		}
	}
	var d dashboard
	if err := json.Unmarshal(Dashboard, &d); err != nil {
		return nil, fmt.Errorf("reading the dashboard: %w", err)
	}
	ids := map[int]bool{}
	var walk func([]panel) error
	walk = func(ps []panel) error {
		for _, p := range ps {
			if ids[p.ID] {
				return fmt.Errorf("reading the dashboard: panel id %d repeated", p.ID)
			}
			ids[p.ID] = true
			if p.Type != "row" && len(p.Targets) == 0 {
				return fmt.Errorf("reading the dashboard: panel %q has no query", p.Title)
			}
			for _, t := range p.Targets {
				if strings.TrimSpace(t.Expr) == "" {
					return fmt.Errorf("reading the dashboard: panel %q has an empty query", p.Title)
				}
				out = append(out, Expression{Where: "panel " + p.Title, Expr: t.Expr})
			}
			if err := walk(p.Panels); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(d.Panels); err != nil {
		return nil, err
	}
	return out, nil
}

// promqlWords are PromQL's keywords and the identifiers that are not metric names where the
// tokenizer meets them outside a call or a label list.
var promqlWords = map[string]bool{
	"and": true, "or": true, "unless": true, "by": true, "without": true, "on": true,
	"ignoring": true, "group_left": true, "group_right": true, "offset": true, "bool": true,
	"inf": true, "nan": true, "atan2": true,
}

// labelListWords are the keywords followed by a parenthesized list of label names.
var labelListWords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}

// MetricNames returns the metric names expr uses, sorted and without repeats: the identifiers
// that are neither functions (followed by a parenthesis), keywords, label names (inside {} or
// a by/without/on/ignoring list), durations (inside [] or after offset) nor numbers. The name
// of a series selector written as {__name__="..."} is not found.
func MetricNames(expr string) []string {
	var names []string
	s := expr
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			i = skipString(s, i)
		case c == '{':
			i = skipTo(s, i, '}')
		case c == '[':
			i = skipTo(s, i, ']')
		case c == '#':
			i = skipTo(s, i, '\n')
		case c >= '0' && c <= '9' || c == '.':
			for i < len(s) && (isIdent(s[i]) || s[i] == '.') {
				i++
			}
		case isIdentStart(c):
			j := i
			for j < len(s) && isIdent(s[j]) {
				j++
			}
			word := s[i:j]
			k := j
			for k < len(s) && (s[k] == ' ' || s[k] == '\t' || s[k] == '\n') {
				k++
			}
			switch {
			case labelListWords[strings.ToLower(word)]:
				if k < len(s) && s[k] == '(' {
					k = skipTo(s, k, ')')
				}
				j = k
			case strings.ToLower(word) == "offset":
				for k < len(s) && (isIdent(s[k]) || s[k] == '-') {
					k++
				}
				j = k
			case promqlWords[strings.ToLower(word)]:
			case k < len(s) && s[k] == '(', nextWordIs(s[k:], "by"), nextWordIs(s[k:], "without"):
				// A function or an aggregation, whose labels may come first (sum by (job) (...)).
			default:
				if !slices.Contains(names, word) {
					names = append(names, word)
				}
			}
			i = j
		default:
			i++
		}
	}
	slices.Sort(names)
	return names
}

// nextWordIs reports whether s starts with the keyword word, case-insensitively.
func nextWordIs(s, word string) bool {
	return len(s) > len(word) && strings.EqualFold(s[:len(word)], word) && !isIdent(s[len(word)])
}

func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

func isIdent(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' }

// skipString returns the index after the string literal starting at s[i].
func skipString(s string, i int) int {
	q := s[i]
	for i++; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if q != '`' {
				i++
			}
		case q:
			return i + 1
		}
	}
	return i
}

// skipTo returns the index after the first end at or after s[i+1], skipping string literals.
func skipTo(s string, i int, end byte) int {
	for i++; i < len(s); {
		switch s[i] {
		case end:
			return i + 1
		case '"', '\'', '`':
			i = skipString(s, i)
		default:
			i++
		}
	}
	return i
}

// Owner is who exports a metric.
type Owner string

// The owners of the kit's metrics.
const (
	OwnerBroker      Owner = "lethe-broker"
	OwnerKeybroker   Owner = "lethe-keybroker"
	OwnerAgent       Owner = "lethe-agent"
	OwnerEveryDaemon Owner = "every daemon" // internal/daemon's NewMetrics
	OwnerPrometheus  Owner = "prometheus"   // synthesized by the scraper, such as up
)

// OwnerOf returns who exports the metric name, from its prefix; "" if no one does.
func OwnerOf(name string) Owner {
	switch {
	case strings.HasPrefix(name, "lethe_broker_"), strings.HasPrefix(name, "lethe_migration_"), strings.HasPrefix(name, "lethe_fleet_"):
		return OwnerBroker
	case strings.HasPrefix(name, "lethe_keybroker_"):
		return OwnerKeybroker
	case strings.HasPrefix(name, "lethe_agent_"):
		return OwnerAgent
	case name == "lethe_nats_errors_total", strings.HasPrefix(name, "go_"), strings.HasPrefix(name, "process_"):
		return OwnerEveryDaemon
	case name == "up", strings.HasPrefix(name, "scrape_"):
		return OwnerPrometheus
	}
	return ""
}

// Uses returns the kit's metric names, each with the places that use it.
func Uses() (map[string][]string, error) {
	exprs, err := Expressions()
	if err != nil {
		return nil, err
	}
	uses := map[string][]string{}
	for _, e := range exprs {
		for _, n := range MetricNames(e.Expr) {
			if !slices.Contains(uses[n], e.Where) {
				uses[n] = append(uses[n], e.Where)
			}
		}
	}
	return uses, nil
}

// Missing returns, sorted, a line for each metric of the kit that owner or every daemon
// exports but g does not gather, naming where it is used. A histogram's _bucket, _sum and
// _count series count as the histogram, a summary's _sum and _count as the summary. g gathers
// only the vectors that have a child: the caller sets one of each first.
func Missing(g prometheus.Gatherer, owner Owner) ([]string, error) {
	uses, err := Uses()
	if err != nil {
		return nil, err
	}
	mfs, err := g.Gather()
	if err != nil {
		return nil, fmt.Errorf("gathering: %w", err)
	}
	have := map[string]bool{}
	for _, mf := range mfs {
		name := mf.GetName()
		have[name] = true
		switch mf.GetType().String() {
		case "HISTOGRAM", "GAUGE_HISTOGRAM":
			have[name+"_bucket"], have[name+"_sum"], have[name+"_count"] = true, true, true
		case "SUMMARY":
			have[name+"_sum"], have[name+"_count"] = true, true
		}
	}
	var missing []string
	for name, where := range uses {
		if o := OwnerOf(name); (o == owner || o == OwnerEveryDaemon) && !have[name] {
			missing = append(missing, fmt.Sprintf("%s (used by %s)", name, strings.Join(where, ", ")))
		}
	}
	slices.Sort(missing)
	return missing, nil
}
