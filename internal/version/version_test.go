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
