package release

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
	"time"
)

// File is one regular file of an archive.
type File struct {
	// Name is the slash-separated path inside the archive, without a leading slash.
	Name string
	// Mode is the file's permission bits (0o755 for binaries, 0o644 otherwise).
	Mode int64
	// Data is the file's content.
	Data []byte
}

// WriteTar writes files as a tar stream to w, sorted by name, each parent directory once
// before its files, every entry owned by 0:0 with no user or group names and modified at
// mtime: the bytes depend on files and mtime only.
func WriteTar(w io.Writer, files []File, mtime time.Time) error {
	files = slices.Clone(files)
	slices.SortFunc(files, func(a, b File) int { return strings.Compare(a.Name, b.Name) })
	tw := tar.NewWriter(w)
	dirs := map[string]bool{}
	mtime = mtime.UTC().Truncate(time.Second)
	for _, f := range files {
		if f.Name == "" || strings.HasPrefix(f.Name, "/") || path.Clean(f.Name) != f.Name {
			return fmt.Errorf("writing tar: bad file name %q", f.Name)
		}
		var parents []string
		for d := path.Dir(f.Name); d != "."; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for _, d := range slices.Backward(parents) {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
				return fmt.Errorf("writing tar: %w", err)
			}
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: f.Name, Mode: f.Mode, Size: int64(len(f.Data)), ModTime: mtime, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("writing tar: %w", err)
		}
		if _, err := tw.Write(f.Data); err != nil {
			return fmt.Errorf("writing tar: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("writing tar: %w", err)
	}
	return nil
}

// TarGz returns files as a gzipped tar (WriteTar), the gzip header without name or time.
func TarGz(files []File, mtime time.Time) ([]byte, error) {
	t, err := tarBytes(files, mtime)
	if err != nil {
		return nil, err
	}
	return gzipBytes(t)
}

func tarBytes(files []File, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	if err := WriteTar(&buf, files, mtime); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func gzipBytes(b []byte) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(b); err != nil {
		return nil, fmt.Errorf("compressing: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("compressing: %w", err)
	}
	return buf.Bytes(), nil
}
