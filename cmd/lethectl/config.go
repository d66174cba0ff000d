package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/lethe-cc/lethe/internal/strictyaml"
)

// maxConfigSize bounds lethectl's configuration file.
const maxConfigSize = 1 << 20

// configFile is lethectl's configuration file: one YAML mapping (JSON is YAML too) whose keys
// are the names of the flags they stand for, as in the daemons' files. It is read strictly:
// an unknown or repeated key, a value of the wrong type, anchors, aliases and tags are errors
// naming the file, line and column.
type configFile struct {
	NATSURL  string `yaml:"nats-url"`
	Creds    string `yaml:"creds"`
	User     string `yaml:"user"`
	Password string `yaml:"password"`
	Tenant   string `yaml:"tenant"`
	// LegacyNATSURL is nats-url under its former key, read with a warning.
	LegacyNATSURL string `yaml:"natsUrl"`
}

// configPath returns the configuration file to read and whether it was named (by --config,
// LETHE_CONFIG or the deprecated LETHECTL_CONFIG) rather than the default, which may be
// absent: $XDG_CONFIG_HOME/lethe/lethectl.yaml, or lethectl.json, its former name, where only
// that exists. warn receives a warning for a deprecated name.
func configPath(flag string, warn io.Writer) (path string, named bool) {
	if flag != "" {
		return flag, true
	}
	if p := os.Getenv("LETHE_CONFIG"); p != "" {
		return p, true
	}
	if p := os.Getenv("LETHECTL_CONFIG"); p != "" {
		fmt.Fprintln(warn, "lethectl: warning: LETHECTL_CONFIG is deprecated: use LETHE_CONFIG")
		return p, true
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", false
	}
	path = filepath.Join(dir, "lethe", "lethectl.yaml")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if old := filepath.Join(dir, "lethe", "lethectl.json"); fileExists(old) {
			return old, false
		}
	}
	return path, false
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// readConfigFile reads lethectl's configuration file at path. An absent file is an empty
// configuration unless named says the user asked for it. Its problems are returned as
// *strictyaml.Error values joined with errors.Join; warn receives a warning for a
// deprecated key.
func readConfigFile(path string, named bool, warn io.Writer) (configFile, error) {
	var c configFile
	if path == "" {
		return c, nil
	}
	f, err := os.Open(path)
	if err != nil {
		if !named && errors.Is(err, os.ErrNotExist) {
			return c, nil
		}
		return c, fmt.Errorf("reading config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return c, fmt.Errorf("reading config %s: %w", path, err)
	}
	if len(data) > maxConfigSize {
		return c, &strictyaml.Error{File: path, Message: fmt.Sprintf("larger than %d bytes", maxConfigSize)}
	}
	doc, err := strictyaml.Parse(path, data)
	if err != nil {
		return c, err
	}
	if k := doc.Kind(); k != strictyaml.KindMapping && k != strictyaml.KindNull {
		p := doc.Position()
		return c, &strictyaml.Error{File: path, Line: p.Line, Column: p.Column, Message: "expected a mapping of flag names (nats-url, creds, user, password, tenant) to values, got " + k.String()}
	}
	pos, err := doc.Decode(&c, strictyaml.Options{})
	if err != nil {
		return c, err
	}
	if c.LegacyNATSURL != "" {
		p, _ := pos.Of("natsUrl")
		if c.NATSURL != "" {
			return c, &strictyaml.Error{File: path, Line: p.Line, Column: p.Column, Path: "natsUrl", Message: "the former name of nats-url, which the file gives too: keep nats-url"}
		}
		fmt.Fprintf(warn, "lethectl: warning: %s:%d:%d: key natsUrl is deprecated: use nats-url\n", path, p.Line, p.Column)
		c.NATSURL = c.LegacyNATSURL
	}
	return c, nil
}

// envSecret returns the secret of the environment variable name, or of the file that
// name+"_FILE" names (without its trailing newline); both set is an error.
func envSecret(name string) (string, error) {
	v, file := os.Getenv(name), os.Getenv(name+"_FILE")
	switch {
	case v != "" && file != "":
		return "", fmt.Errorf("environment variables %s and %s_FILE are both set: give one", name, name)
	case file != "":
		data, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("environment variable %s_FILE: reading the secret: %w", name, err)
		}
		return strings.TrimRight(string(data), "\r\n"), nil
	}
	return v, nil
}
