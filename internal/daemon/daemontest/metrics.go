package daemontest

import (
	"os"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricsDocumented checks that reg holds exactly want metric families named lethe_… and that
// the configuration reference lists each of them. The caller touches every metric first, so
// that vectors without a series are gathered too.
func MetricsDocumented(t *testing.T, reg *prometheus.Registry, want int) {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(ConfigurationDoc)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range families {
		name := f.GetName()
		if !strings.HasPrefix(name, "lethe_") {
			continue
		}
		n++
		if !strings.Contains(string(doc), "`"+name+"`") {
			t.Errorf("metric %s is not documented in %s", name, ConfigurationDoc)
		}
	}
	if n != want {
		t.Errorf("%d lethe metrics, want %d: update this test and the documentation together", n, want)
	}
}
