// Package evidencetest finds the corpus of real attestation evidence that Lethe's tests check
// themselves against: SEV-SNP reports and TDX quotes captured on hardware by other projects,
// with their certificates and Intel collateral, laid out as <owner>_<repo>/<path in that
// repository> beside a SOURCES.md that names each file's origin and expected outcome. The
// corpus is never part of the repository. Tests read it where it is (LETHE_EVIDENCE_DIR, by
// default ../shared/evidence beside the module's root), skip where it is absent, and fail
// instead when CI=true, where it must be.
package evidencetest

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Dir returns the corpus directory: LETHE_EVIDENCE_DIR if set, else ../shared/evidence beside
// the module's root (the nearest directory at or above the working directory holding go.mod).
// It returns "" if neither can be worked out.
func Dir() string {
	if d := os.Getenv("LETHE_EVIDENCE_DIR"); d != "" {
		return d
	}
	wd, err := os.Getwd()
	if err != nil {
		return ""
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Join(filepath.Dir(d), "shared", "evidence")
		}
		if filepath.Dir(d) == d {
			return ""
		}
	}
}

// Path returns the path of the corpus file rel (slash-separated, below Dir). Where it is absent
// it skips t, or fails it when CI=true.
func Path(t testing.TB, rel string) string {
	t.Helper()
	p := filepath.Join(Dir(), filepath.FromSlash(rel))
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("real evidence %s is missing (LETHE_EVIDENCE_DIR): %v", rel, err)
		}
		t.Skipf("real evidence %s is not here (LETHE_EVIDENCE_DIR): %v", rel, err)
	}
	return p
}

// Read returns the bytes of the corpus file rel, as Path finds it.
func Read(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(Path(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
