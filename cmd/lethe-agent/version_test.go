package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestPrintVersion(t *testing.T) {
	var b bytes.Buffer
	printVersion(&b)
	want := "emulation: built in"
	if !emulationBuiltIn {
		want = "emulation: not built"
	}
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "lethe-agent ") || lines[1] != want {
		t.Errorf("--version printed %q, want the version and %q", b.String(), want)
	}
}
