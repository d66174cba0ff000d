package release

import (
	"bytes"
	"crypto/sha256"
	"debug/buildinfo"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Binary is a built binary of a release, with the build information the go command embedded
// in it.
type Binary struct {
	// Name is the binary's file name (lethe-broker).
	Name string
	// Data is the executable.
	Data []byte
	// Info is what buildinfo.Read found in Data.
	Info *buildinfo.BuildInfo
}

// ReadBinary reads the build information of the executable data called name.
func ReadBinary(name string, data []byte) (Binary, error) {
	info, err := buildinfo.Read(bytes.NewReader(data))
	if err != nil {
		return Binary{}, fmt.Errorf("reading build information of %s: %w", name, err)
	}
	return Binary{Name: name, Data: data, Info: info}, nil
}

// cdx* are the parts of CycloneDX 1.5 JSON an SBOM of Go binaries uses.
type cdxBOM struct {
	BOMFormat    string          `json:"bomFormat"`
	SpecVersion  string          `json:"specVersion"`
	SerialNumber string          `json:"serialNumber"`
	Version      int             `json:"version"`
	Metadata     cdxMetadata     `json:"metadata"`
	Components   []cdxComponent  `json:"components"`
	Dependencies []cdxDependency `json:"dependencies"`
}

type cdxMetadata struct {
	Timestamp string       `json:"timestamp"`
	Component cdxComponent `json:"component"`
}

type cdxComponent struct {
	BOMRef     string        `json:"bom-ref"`
	Type       string        `json:"type"`
	Name       string        `json:"name"`
	Version    string        `json:"version,omitempty"`
	PURL       string        `json:"purl,omitempty"`
	Hashes     []cdxHash     `json:"hashes,omitempty"`
	Properties []cdxProperty `json:"properties,omitempty"`
}

type cdxHash struct {
	Alg     string `json:"alg"`
	Content string `json:"content"`
}

type cdxProperty struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

type cdxDependency struct {
	Ref       string   `json:"ref"`
	DependsOn []string `json:"dependsOn"`
}

// SBOM returns a CycloneDX 1.5 JSON SBOM of an archive called name holding bins, at version,
// made at created: the archive as the metadata's component, each binary as an application
// (with its SHA-256, Go release and build settings) depending on the Go modules and the Go
// standard library linked into it. Its serial number is derived from its content, so the same
// binaries give the same bytes.
func SBOM(name, version string, created time.Time, bins []Binary) ([]byte, error) {
	bom := cdxBOM{
		BOMFormat: "CycloneDX", SpecVersion: "1.5", Version: 1,
		Metadata: cdxMetadata{
			Timestamp: created.UTC().Format(time.RFC3339),
			Component: cdxComponent{BOMRef: name, Type: "application", Name: name, Version: version},
		},
		Components: []cdxComponent{}, Dependencies: []cdxDependency{},
	}
	modules := map[string]cdxComponent{}
	top := cdxDependency{Ref: name, DependsOn: []string{}}
	for _, b := range bins {
		sum := sha256.Sum256(b.Data)
		c := cdxComponent{
			BOMRef: "bin:" + b.Name, Type: "application", Name: b.Name, Version: version,
			Hashes:     []cdxHash{{Alg: "SHA-256", Content: fmt.Sprintf("%x", sum)}},
			Properties: []cdxProperty{{Name: "lethe:go:version", Value: b.Info.GoVersion}, {Name: "lethe:go:package", Value: b.Info.Path}},
		}
		for _, s := range b.Info.Settings {
			c.Properties = append(c.Properties, cdxProperty{Name: "lethe:go:build:" + s.Key, Value: s.Value})
		}
		bom.Components = append(bom.Components, c)
		top.DependsOn = append(top.DependsOn, c.BOMRef)
		dep := cdxDependency{Ref: c.BOMRef}
		std := goModule("stdlib", strings.TrimPrefix(b.Info.GoVersion, "go"))
		modules[std.BOMRef] = std
		dep.DependsOn = append(dep.DependsOn, std.BOMRef)
		for _, m := range b.Info.Deps {
			if m.Replace != nil {
				m = m.Replace
			}
			mc := goModule(m.Path, m.Version)
			modules[mc.BOMRef] = mc
			dep.DependsOn = append(dep.DependsOn, mc.BOMRef)
		}
		slices.Sort(dep.DependsOn)
		bom.Dependencies = append(bom.Dependencies, dep)
	}
	for _, ref := range slices.Sorted(maps.Keys(modules)) {
		bom.Components = append(bom.Components, modules[ref])
	}
	bom.Dependencies = append([]cdxDependency{top}, bom.Dependencies...)
	body, err := json.Marshal(bom)
	if err != nil {
		return nil, fmt.Errorf("encoding SBOM: %w", err)
	}
	u := sha256.Sum256(body)
	u[6], u[8] = u[6]&0x0f|0x50, u[8]&0x3f|0x80 // a name-based UUID (version 5 layout)
	bom.SerialNumber = fmt.Sprintf("urn:uuid:%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
	out, err := json.MarshalIndent(bom, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding SBOM: %w", err)
	}
	return append(out, '\n'), nil
}

// goModule is the component of a Go module at version, with its package URL.
func goModule(path, version string) cdxComponent {
	purl := "pkg:golang/" + path + "@" + version
	return cdxComponent{BOMRef: purl, Type: "library", Name: path, Version: version, PURL: purl}
}
