package version

import (
	"runtime"
	"strings"
	"testing"
)

func TestString(t *testing.T) {
	Version = "v1.2.3"
	t.Cleanup(func() { Version = "" })
	got := String("lethe-agent")
	if !strings.HasPrefix(got, "lethe-agent v1.2.3 (") || !strings.HasSuffix(got, runtime.Version()+")") {
		t.Errorf("String = %q, want lethe-agent v1.2.3 (…%s)", got, runtime.Version())
	}
}

func TestRequested(t *testing.T) {
	for args, want := range map[string]bool{
		"--version":             true,
		"-version":              true,
		"":                      false,
		"--version --dev":       false,
		"--versions":            false,
		"nats-config --version": false,
	} {
		if got := Requested(strings.Fields(args)); got != want {
			t.Errorf("Requested(%q) = %v, want %v", args, got, want)
		}
	}
}

func TestInfo(t *testing.T) {
	Version = "v1.2.3"
	t.Cleanup(func() { Version = "" })
	b := Info()
	if b.Version != "v1.2.3" || b.GoVersion != runtime.Version() {
		t.Errorf("Info = %+v, want version v1.2.3 and Go %s", b, runtime.Version())
	}
	Version = ""
	if b := Info(); b.Version == "" {
		t.Error("Info without a stamp has an empty version, want the module's or devel")
	}
}
