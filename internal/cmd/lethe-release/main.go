// Command lethe-release packages built binaries of Lethe into its release artifacts
// (scripts/release.sh runs it; see internal/release) and verifies a release:
//
//	lethe-release package -dist DIR -version V -epoch SECONDS -platform OS/ARCH -bins DIR [FILE...]
//	lethe-release sign -dist DIR -key release.key
//	lethe-release verify -key release.pub DIR
//
// package writes, for one platform, lethe-V-OS-ARCH.tar.gz (the binaries under bin/, each
// FILE under its own relative path), its SBOM lethe-V-OS-ARCH.cdx.json, and an OCI image
// layout NAME-V-OS-ARCH.oci.tar of each daemon (every binary but lethectl). sign writes
// SHA256SUMS of every other file in DIR and SHA256SUMS.sig, its Ed25519 signature by the key
// (PKCS #8 PEM, as `lethectl keygen` writes). verify checks both.
package main

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/lethe-cc/lethe/internal/release"
	"github.com/lethe-cc/lethe/policy"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "lethe-release:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: lethe-release package|sign|verify [flags]")
	}
	fs := flag.NewFlagSet("lethe-release "+args[0], flag.ContinueOnError)
	dist := fs.String("dist", "dist", "the release directory")
	key := fs.String("key", "", "the signing key (sign: private, verify: public), PEM")
	ver := fs.String("version", "", "the release version (package)")
	epoch := fs.Int64("epoch", 0, "the time of every file, in seconds since 1970 (package): SOURCE_DATE_EPOCH")
	plat := fs.String("platform", "", "OS/ARCH (package)")
	bins := fs.String("bins", "", "the directory of the platform's binaries (package)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	switch args[0] {
	case "package":
		goos, arch, ok := strings.Cut(*plat, "/")
		if !ok || *ver == "" || *bins == "" {
			return errors.New("package needs -version, -platform OS/ARCH and -bins")
		}
		return packagePlatform(*dist, *ver, time.Unix(*epoch, 0), release.Platform{OS: goos, Architecture: arch}, *bins, fs.Args())
	case "sign":
		priv, err := policy.ReadPrivateKey(*key)
		if err != nil {
			return err
		}
		return sign(*dist, priv)
	case "verify":
		pub, err := policy.ReadPublicKey(*key)
		if err != nil {
			return err
		}
		if fs.NArg() != 1 {
			return errors.New("verify needs the release directory")
		}
		names, err := release.Verify(fs.Arg(0), pub)
		if err != nil {
			return err
		}
		fmt.Printf("%s: signature good; %d files match SHA256SUMS\n", fs.Arg(0), len(names))
		return nil
	}
	return fmt.Errorf("unknown command %q", args[0])
}

func packagePlatform(dist, ver string, mtime time.Time, plat release.Platform, binDir string, extra []string) error {
	entries, err := os.ReadDir(binDir)
	if err != nil {
		return err
	}
	base := fmt.Sprintf("lethe-%s-%s-%s", ver, plat.OS, plat.Architecture)
	var bins []release.Binary
	var files []release.File
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(binDir, e.Name()))
		if err != nil {
			return err
		}
		b, err := release.ReadBinary(e.Name(), data)
		if err != nil {
			return err
		}
		bins = append(bins, b)
		files = append(files, release.File{Name: base + "/bin/" + e.Name(), Mode: 0o755, Data: data})
	}
	for _, name := range extra {
		data, err := os.ReadFile(name)
		if err != nil {
			return err
		}
		files = append(files, release.File{Name: base + "/" + filepath.ToSlash(filepath.Clean(name)), Mode: 0o644, Data: data})
	}
	out := map[string][]byte{}
	if out[base+".tar.gz"], err = release.TarGz(files, mtime); err != nil {
		return err
	}
	if out[base+".cdx.json"], err = release.SBOM(base, ver, mtime, bins); err != nil {
		return err
	}
	for _, b := range bins {
		if b.Name == "lethectl" {
			continue
		}
		layout, err := release.Image(b, plat, ver, mtime)
		if err != nil {
			return err
		}
		var buf bytes.Buffer
		if err := release.WriteTar(&buf, layout, mtime); err != nil {
			return err
		}
		out[fmt.Sprintf("%s-%s-%s-%s.oci.tar", b.Name, ver, plat.OS, plat.Architecture)] = buf.Bytes()
	}
	if err := os.MkdirAll(dist, 0o755); err != nil {
		return err
	}
	for _, name := range slices.Sorted(maps.Keys(out)) {
		if err := os.WriteFile(filepath.Join(dist, name), out[name], 0o644); err != nil {
			return err
		}
		fmt.Println(filepath.Join(dist, name))
	}
	return nil
}

func sign(dist string, priv ed25519.PrivateKey) error {
	entries, err := os.ReadDir(dist)
	if err != nil {
		return err
	}
	files := map[string][]byte{}
	for _, e := range entries {
		if e.IsDir() || e.Name() == release.SumsFile || e.Name() == release.SignatureFile {
			continue
		}
		if files[e.Name()], err = os.ReadFile(filepath.Join(dist, e.Name())); err != nil {
			return err
		}
	}
	sums := release.Sums(files)
	if err := os.WriteFile(filepath.Join(dist, release.SumsFile), sums, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dist, release.SignatureFile), release.Sign(priv, sums), 0o644)
}
