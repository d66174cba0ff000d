package attest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// RootsFile is the name of the file, in a platform's folder of a trust-roots directory, that
// holds that platform's Roots as JSON: DIR/emulated-sev-snp/roots.json.
const RootsFile = "roots.json"

// SaveRoots writes r to dir/<platform>/roots.json. It writes public material only.
func SaveRoots(dir string, r Roots) error {
	pdir := filepath.Join(dir, r.Platform.String())
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		return fmt.Errorf("saving roots: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("saving roots: %w", err)
	}
	if err := os.WriteFile(filepath.Join(pdir, RootsFile), b, 0o644); err != nil {
		return fmt.Errorf("saving roots: %w", err)
	}
	return nil
}

// LoadRoots reads every platform's roots from a trust-roots directory written by SaveRoots.
// A directory with no roots in it is an error: a caller that names a directory means to trust
// something in it.
func LoadRoots(dir string) ([]Roots, error) {
	var out []Roots
	for _, p := range Platforms {
		b, err := os.ReadFile(filepath.Join(dir, p.String(), RootsFile))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("loading roots: %w", err)
		}
		var r Roots
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("loading roots of %v: %w", p, err)
		}
		if r.Platform != p {
			return nil, fmt.Errorf("loading roots: %s/%s names platform %v", p, RootsFile, r.Platform)
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("loading roots: no %s under %s", RootsFile, dir)
	}
	return out, nil
}
