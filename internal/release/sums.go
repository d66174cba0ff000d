package release

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Names of the checksum file of a release and of its signature.
const (
	SumsFile      = "SHA256SUMS"
	SignatureFile = "SHA256SUMS.sig"
)

// ErrBadSignature is returned by Verify when SHA256SUMS.sig is not the key's signature of
// SHA256SUMS.
var ErrBadSignature = errors.New("SHA256SUMS is not signed by this key")

// Sums returns the SHA256SUMS of files (name to content), as sha256sum writes it: one line
// "HEX  NAME" per file, sorted by name; `sha256sum -c SHA256SUMS` checks it.
func Sums(files map[string][]byte) []byte {
	var b bytes.Buffer
	for _, name := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(&b, "%x  %s\n", sha256.Sum256(files[name]), name)
	}
	return b.Bytes()
}

// Sign returns the signature file of sums: the Ed25519 signature by key, base64, on one line.
func Sign(key ed25519.PrivateKey, sums []byte) []byte {
	return []byte(base64.StdEncoding.EncodeToString(ed25519.Sign(key, sums)) + "\n")
}

// Verify checks the release in dir: that SHA256SUMS.sig is pub's signature of SHA256SUMS
// (else ErrBadSignature) and that every file SHA256SUMS lists is in dir with that checksum. It
// returns the names of the files it checked.
func Verify(dir string, pub ed25519.PublicKey) ([]string, error) {
	sums, err := os.ReadFile(filepath.Join(dir, SumsFile))
	if err != nil {
		return nil, fmt.Errorf("reading checksums: %w", err)
	}
	sigText, err := os.ReadFile(filepath.Join(dir, SignatureFile))
	if err != nil {
		return nil, fmt.Errorf("reading signature: %w", err)
	}
	sig, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(sigText)))
	if err != nil {
		return nil, fmt.Errorf("decoding signature: %w", err)
	}
	if !ed25519.Verify(pub, sums, sig) {
		return nil, ErrBadSignature
	}
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(sums))
	for sc.Scan() {
		want, name, ok := strings.Cut(sc.Text(), "  ")
		if !ok || name == "" || filepath.Base(name) != name {
			return nil, fmt.Errorf("parsing checksums: bad line %q", sc.Text())
		}
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", name, err)
		}
		if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != want {
			return nil, fmt.Errorf("checking %s: SHA-256 %x, SHA256SUMS says %s", name, got, want)
		}
		names = append(names, name)
	}
	if len(names) == 0 {
		return nil, errors.New("checking checksums: SHA256SUMS lists no file")
	}
	return names, nil
}
