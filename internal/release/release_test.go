package release

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/ed25519"
	"crypto/sha256"
	"debug/buildinfo"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var epoch = time.Unix(1_700_000_000, 0)

// readTar returns the entries of a tar stream by name, failing on entries that are not
// owned by 0:0 or not dated mtime.
func readTar(t *testing.T, r io.Reader, mtime time.Time) map[string]*tar.Header {
	t.Helper()
	tr := tar.NewReader(r)
	headers := map[string]*tar.Header{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return headers
		}
		if err != nil {
			t.Fatalf("reading tar: %v", err)
		}
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || !h.ModTime.Equal(mtime) {
			t.Errorf("%s: owner %d:%d (%q:%q) at %v, want 0:0 at %v", h.Name, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime, mtime)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("reading %s: %v", h.Name, err)
		}
		h.PAXRecords = map[string]string{"data": string(data)} // the content, for the tests
		headers[h.Name] = h
	}
}

func TestTarGzReproducible(t *testing.T) {
	files := []File{
		{Name: "lethe/bin/lethectl", Mode: 0o755, Data: []byte("binary")},
		{Name: "lethe/README.md", Mode: 0o644, Data: []byte("read me")},
	}
	a, err := TarGz(files, epoch)
	if err != nil {
		t.Fatal(err)
	}
	b, err := TarGz([]File{files[1], files[0]}, epoch.Add(999*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Error("the same files in another order (and a time within the second) give other bytes")
	}
	zr, err := gzip.NewReader(bytes.NewReader(a))
	if err != nil {
		t.Fatal(err)
	}
	if !zr.ModTime.IsZero() || zr.Name != "" {
		t.Errorf("gzip header names %q at %v, want neither", zr.Name, zr.ModTime)
	}
	var names []string
	for name, h := range readTar(t, zr, epoch) {
		names = append(names, fmt.Sprintf("%s %o", name, h.Mode))
	}
	want := []string{"lethe/ 755", "lethe/README.md 644", "lethe/bin/ 755", "lethe/bin/lethectl 755"}
	slices.Sort(names)
	if !slices.Equal(names, want) {
		t.Errorf("entries %v, want %v", names, want)
	}
	if _, err := TarGz([]File{{Name: "/etc/passwd"}}, epoch); err == nil {
		t.Error("TarGz took an absolute name")
	}
}

// checkLayout parses the OCI image layout in tar stream r as a registry would and checks that
// it holds one manifest for platform whose blobs match their digests and sizes, whose config
// names the layer's uncompressed digest, and whose layer holds binary at the entrypoint.
func checkLayout(t *testing.T, r io.Reader, platform Platform, binary string, mtime time.Time) {
	t.Helper()
	entries := readTar(t, r, mtime)
	content := func(name string) []byte {
		h, ok := entries[name]
		if !ok {
			t.Fatalf("layout lacks %s", name)
		}
		return []byte(h.PAXRecords["data"])
	}
	blob := func(d Descriptor, mediaType string) []byte {
		if d.MediaType != mediaType {
			t.Errorf("descriptor %s has media type %s, want %s", d.Digest, d.MediaType, mediaType)
		}
		b := content("blobs/sha256/" + strings.TrimPrefix(d.Digest, "sha256:"))
		if got := fmt.Sprintf("sha256:%x", sha256.Sum256(b)); got != d.Digest || int64(len(b)) != d.Size {
			t.Errorf("blob %s: digest %s, size %d; descriptor says size %d", d.Digest, got, len(b), d.Size)
		}
		return b
	}
	var layout struct{ ImageLayoutVersion string }
	if err := json.Unmarshal(content("oci-layout"), &layout); err != nil || layout.ImageLayoutVersion != "1.0.0" {
		t.Errorf("oci-layout: %+v, %v", layout, err)
	}
	var index Index
	if err := json.Unmarshal(content("index.json"), &index); err != nil {
		t.Fatal(err)
	}
	if index.SchemaVersion != 2 || len(index.Manifests) != 1 || index.Manifests[0].Platform == nil || *index.Manifests[0].Platform != platform {
		t.Fatalf("index.json = %+v, want one manifest for %v", index, platform)
	}
	var m Manifest
	if err := json.Unmarshal(blob(index.Manifests[0], MediaTypeManifest), &m); err != nil {
		t.Fatal(err)
	}
	var cfg ImageConfig
	if err := json.Unmarshal(blob(m.Config, MediaTypeConfig), &cfg); err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 1 {
		t.Fatalf("manifest has %d layers, want 1", len(m.Layers))
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob(m.Layers[0], MediaTypeLayer)))
	if err != nil {
		t.Fatal(err)
	}
	layerTar, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("sha256:%x", sha256.Sum256(layerTar)); len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != want {
		t.Errorf("config diff_ids %v, want [%s]", cfg.RootFS.DiffIDs, want)
	}
	entry := "/" + ImageBinDir + "/" + binary
	if cfg.OS != platform.OS || cfg.Architecture != platform.Architecture || len(cfg.Config.Entrypoint) != 1 || cfg.Config.Entrypoint[0] != entry || cfg.Config.User != "65534:65534" {
		t.Errorf("config = %+v, want %v running %s as 65534", cfg, platform, entry)
	}
	files := readTar(t, bytes.NewReader(layerTar), mtime)
	if h := files[entry[1:]]; h == nil || h.Mode != 0o755 || h.Size == 0 {
		t.Errorf("layer lacks the executable %s: %+v", entry, h)
	}
}

func TestImageLayout(t *testing.T) {
	platform := Platform{OS: "linux", Architecture: "arm64"}
	files, err := Image(Binary{Name: "lethe-broker", Data: []byte("\x7fELF a static binary")}, platform, "v1.2.3", epoch)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteTar(&buf, files, epoch); err != nil {
		t.Fatal(err)
	}
	checkLayout(t, &buf, platform, "lethe-broker", epoch)
}

func TestSBOM(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := ReadBinary("release.test", data)
	if err != nil {
		t.Fatal(err)
	}
	a, err := SBOM("lethe-v1.2.3-linux-amd64", "v1.2.3", epoch, []Binary{bin})
	if err != nil {
		t.Fatal(err)
	}
	b, err := SBOM("lethe-v1.2.3-linux-amd64", "v1.2.3", epoch, []Binary{bin})
	if err != nil || !bytes.Equal(a, b) {
		t.Errorf("two SBOMs of one binary differ (%v)", err)
	}
	var bom struct {
		BOMFormat, SpecVersion, SerialNumber string
		Components                           []struct{ Type, Name, PURL string }
		Dependencies                         []struct{ Ref string }
	}
	if err := json.Unmarshal(a, &bom); err != nil {
		t.Fatal(err)
	}
	if bom.BOMFormat != "CycloneDX" || bom.SpecVersion != "1.5" || !strings.HasPrefix(bom.SerialNumber, "urn:uuid:") || len(bom.SerialNumber) != len("urn:uuid:")+36 {
		t.Errorf("SBOM header %s %s %s", bom.BOMFormat, bom.SpecVersion, bom.SerialNumber)
	}
	purls := map[string]bool{}
	for _, c := range bom.Components {
		purls[c.PURL] = true
	}
	info, _ := buildinfo.ReadFile(exe)
	for _, want := range []string{"pkg:golang/stdlib@" + strings.TrimPrefix(info.GoVersion, "go")} {
		if !purls[want] {
			t.Errorf("SBOM lacks %s", want)
		}
	}
	for _, d := range info.Deps {
		if !purls["pkg:golang/"+d.Path+"@"+d.Version] && d.Replace == nil {
			t.Errorf("SBOM lacks the module %s@%s", d.Path, d.Version)
		}
	}
}

func TestVerify(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	otherPub, _, _ := ed25519.GenerateKey(nil)
	dir := t.TempDir()
	files := map[string][]byte{"lethe-v1-linux-amd64.tar.gz": []byte("archive"), "lethe-v1-linux-amd64.cdx.json": []byte("{}")}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sums := Sums(files)
	if err := os.WriteFile(filepath.Join(dir, SumsFile), sums, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, SignatureFile), Sign(priv, sums), 0o644); err != nil {
		t.Fatal(err)
	}
	if names, err := Verify(dir, pub); err != nil || len(names) != 2 {
		t.Fatalf("Verify = %v, %v; want the 2 files", names, err)
	}
	if _, err := Verify(dir, otherPub); !errors.Is(err, ErrBadSignature) {
		t.Errorf("Verify with another key: %v, want ErrBadSignature", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "lethe-v1-linux-amd64.tar.gz"), []byte("tampered"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(dir, pub); err == nil || !strings.Contains(err.Error(), "lethe-v1-linux-amd64.tar.gz") {
		t.Errorf("Verify of a changed archive: %v, want an error naming it", err)
	}
}
