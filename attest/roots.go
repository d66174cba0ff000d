package attest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// RootsFile is the name of the file, in a platform's folder of a trust-roots directory, that
// holds that platform's Roots as JSON: DIR/emulated-sev-snp/roots.json.
const RootsFile = "roots.json"

// EmulatorCollateralDir is the folder, beside RootsFile, where SaveRoots publishes an
// emulator's collateral in the layout of the offline collateral cache: DIR/<platform>/collateral.
const EmulatorCollateralDir = "collateral"

// SaveRoots writes r to dir/<platform>/roots.json and, for an emulator, its collateral under
// dir/<platform>/collateral, where a Verifier given the roots by LoadRoots reads it on every
// verification. Every file is replaced whole (written aside, then renamed), so that a process
// reading the roots or the collateral meanwhile sees the old file or the new one. It writes
// public material only.
func SaveRoots(dir string, r Roots) error {
	pdir := filepath.Join(dir, r.Platform.String())
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		return fmt.Errorf("saving roots: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("saving roots: %w", err)
	}
	if r.Platform.Emulated() && len(r.Collateral) > 0 {
		c := newCollateralCache(filepath.Join(pdir, EmulatorCollateralDir), false)
		for key, body := range r.Collateral {
			// A headers document goes beside its document, under the same name.
			p, err := c.path(strings.TrimSuffix(key, CollateralHeadersSuffix))
			if err != nil {
				return fmt.Errorf("saving %v collateral: %w", r.Platform, err)
			}
			if strings.HasSuffix(key, CollateralHeadersSuffix) {
				p += CollateralHeadersSuffix
			}
			if err := writeFileAtomic(p, body); err != nil {
				return fmt.Errorf("saving %v collateral: %w", r.Platform, err)
			}
		}
	}
	if err := writeFileAtomic(filepath.Join(pdir, RootsFile), b); err != nil {
		return fmt.Errorf("saving roots: %w", err)
	}
	return nil
}

// writeFileAtomic writes b to name (mode 0644, creating its folder) through a temporary file
// renamed over it.
func writeFileAtomic(name string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(name), ".tmp-"+filepath.Base(name)+"-*")
	if err != nil {
		return err
	}
	_, werr := f.Write(b)
	cerr := f.Close()
	if err := errors.Join(werr, cerr, os.Chmod(f.Name(), 0o644)); err != nil {
		os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), name); err != nil {
		os.Remove(f.Name())
		return err
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
		if cdir := filepath.Join(dir, p.String(), EmulatorCollateralDir); p.Emulated() {
			if st, err := os.Stat(cdir); err == nil && st.IsDir() {
				r.CollateralDir = cdir
			}
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("loading roots: no %s under %s", RootsFile, dir)
	}
	return out, nil
}
