package release

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"time"
)

// OCI media types an image layout of Lethe uses.
const (
	MediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	MediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	MediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
)

// Descriptor is an OCI content descriptor.
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Platform    *Platform         `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Platform is the OS and architecture an image runs on (GOOS and GOARCH spelling).
type Platform struct {
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
}

// Index is an OCI image index (index.json of a layout).
type Index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []Descriptor `json:"manifests"`
}

// Manifest is an OCI image manifest.
type Manifest struct {
	SchemaVersion int               `json:"schemaVersion"`
	MediaType     string            `json:"mediaType"`
	Config        Descriptor        `json:"config"`
	Layers        []Descriptor      `json:"layers"`
	Annotations   map[string]string `json:"annotations,omitempty"`
}

// ImageConfig is an OCI image configuration.
type ImageConfig struct {
	Created      string `json:"created"`
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
	Config       struct {
		User       string            `json:"User"`
		Entrypoint []string          `json:"Entrypoint"`
		Labels     map[string]string `json:"Labels,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// ImageBinDir is where an image holds its binary.
const ImageBinDir = "usr/local/bin"

// Image returns an OCI image layout, as the files of a tar (WriteTar), of bin alone on an
// empty base for platform: one layer with the binary at /usr/local/bin/NAME, run as that
// entrypoint by the unprivileged user 65534 (nobody), tagged version in index.json. The
// binary must be static (CGO_ENABLED=0): the image has no libc.
func Image(bin Binary, platform Platform, version string, created time.Time) ([]File, error) {
	layerTar, err := tarBytes([]File{{Name: ImageBinDir + "/" + bin.Name, Mode: 0o755, Data: bin.Data}}, created)
	if err != nil {
		return nil, err
	}
	layer, err := gzipBytes(layerTar)
	if err != nil {
		return nil, err
	}
	var cfg ImageConfig
	cfg.Created = created.UTC().Format(time.RFC3339)
	cfg.OS, cfg.Architecture = platform.OS, platform.Architecture
	cfg.Config.User = "65534:65534"
	cfg.Config.Entrypoint = []string{"/" + ImageBinDir + "/" + bin.Name}
	cfg.Config.Labels = map[string]string{
		"org.opencontainers.image.title":   bin.Name,
		"org.opencontainers.image.version": version,
	}
	cfg.RootFS.Type = "layers"
	cfg.RootFS.DiffIDs = []string{digest(layerTar)}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encoding image config: %w", err)
	}
	manifest, err := json.Marshal(Manifest{
		SchemaVersion: 2, MediaType: MediaTypeManifest,
		Config: descriptor(MediaTypeConfig, cfgJSON),
		Layers: []Descriptor{descriptor(MediaTypeLayer, layer)},
		Annotations: map[string]string{
			"org.opencontainers.image.created": cfg.Created,
			"org.opencontainers.image.title":   bin.Name,
			"org.opencontainers.image.version": version,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("encoding image manifest: %w", err)
	}
	md := descriptor(MediaTypeManifest, manifest)
	md.Platform = &platform
	md.Annotations = map[string]string{"org.opencontainers.image.ref.name": version}
	index, err := json.Marshal(Index{SchemaVersion: 2, MediaType: MediaTypeIndex, Manifests: []Descriptor{md}})
	if err != nil {
		return nil, fmt.Errorf("encoding image index: %w", err)
	}
	files := []File{
		{Name: "oci-layout", Mode: 0o644, Data: []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{Name: "index.json", Mode: 0o644, Data: index},
	}
	for _, blob := range [][]byte{layer, cfgJSON, manifest} {
		files = append(files, File{Name: "blobs/sha256/" + digest(blob)[len("sha256:"):], Mode: 0o644, Data: blob})
	}
	return files, nil
}

func digest(b []byte) string { return fmt.Sprintf("sha256:%x", sha256.Sum256(b)) }

func descriptor(mediaType string, b []byte) Descriptor {
	return Descriptor{MediaType: mediaType, Digest: digest(b), Size: int64(len(b))}
}
