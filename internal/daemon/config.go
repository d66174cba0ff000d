package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/lethe-cc/lethe/internal/strictyaml"
)

// ConfigFlag is the name of the flag that names a daemon's configuration file.
const ConfigFlag = "config"

// MaxConfigSize bounds a configuration file.
const MaxConfigSize = 1 << 20

// ConfigError is a problem in a configuration file, at a position: its Path is the key the
// problem is with (empty for the file itself) and its Message says what is wrong. Error
// formats it as file:line:col: key: message.
type ConfigError = strictyaml.Error

// Parse parses args into f, then applies the environment variables of the flags args did not
// set, then the configuration file named by the flag "config", if f has one and it is set:
// each key of the file sets the flag of that name unless the command line or its environment
// variable set it. It returns the FlagSet's error (flag.ErrHelp included), an error naming an
// environment variable whose value its flag refuses, an error reading the file, or the
// file's problems as *ConfigError values joined with errors.Join.
func (f *Flags) Parse(args []string) error {
	if err := f.FlagSet.Parse(args); err != nil {
		return err
	}
	set, err := f.applyEnv()
	if err != nil {
		return err
	}
	f.set = set
	cf := f.Lookup(ConfigFlag)
	if cf == nil || cf.Value.String() == "" {
		return nil
	}
	path := cf.Value.String()
	data, err := readConfig(path)
	if err != nil {
		return err
	}
	return f.apply(path, data, set)
}

// readConfig reads a configuration file of at most MaxConfigSize bytes.
func readConfig(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading configuration file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading configuration file %s: %w", path, err)
	}
	if len(data) > MaxConfigSize {
		return nil, &ConfigError{File: path, Message: fmt.Sprintf("larger than %d bytes", MaxConfigSize)}
	}
	return data, nil
}

// apply applies the configuration data (the contents of file) to the flags that are not in
// set (those the command line and the environment set). Every problem is returned, as a
// *ConfigError, joined with errors.Join; flags are set only when the whole file is valid.
func (f *Flags) apply(file string, data []byte, set map[string]bool) error {
	settings, err := decodeConfig(file, data)
	if err != nil {
		return err
	}
	var errs []error
	var todo []strictyaml.Setting
	for _, s := range settings {
		fl := f.Lookup(s.Key)
		switch {
		case fl == nil:
			errs = append(errs, fail(file, s.Position, s.Key, "unknown key: not a flag of %s", f.Name()))
			continue
		case fl.Name == ConfigFlag:
			errs = append(errs, fail(file, s.Position, s.Key, "a configuration file cannot name another"))
			continue
		case f.EnvVar(fl.Name) == "":
			errs = append(errs, fail(file, s.Position, s.Key, "command-line only: give --%s on the command line", fl.Name))
			continue
		case s.List && !f.Repeatable(fl.Name):
			errs = append(errs, fail(file, s.Position, s.Key, "expected one value, got a list (only repeatable flags take lists)"))
			continue
		}
		if set[fl.Name] {
			continue // the command line and the environment come first
		}
		todo = append(todo, s)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// Check every value on a scratch flag set first, so that an invalid file sets nothing.
	for _, s := range todo {
		for _, v := range s.Values {
			if err := checkValue(f.Lookup(s.Key), v.Text); err != nil {
				errs = append(errs, fail(file, v.Position, s.Key, "invalid value %q: %v", v.Text, err))
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	for _, s := range todo {
		set[s.Key] = true
		for _, v := range s.Values {
			if err := f.Set(s.Key, v.Text); err != nil {
				errs = append(errs, fail(file, v.Position, s.Key, "invalid value %q: %v", v.Text, err))
			}
		}
	}
	return errors.Join(errs...)
}

func fail(file string, p strictyaml.Position, key, format string, args ...any) error {
	return &ConfigError{File: file, Line: p.Line, Column: p.Column, Path: key, Message: fmt.Sprintf(format, args...)}
}

// checkValue reports whether f would accept v, without setting f, where f's type allows it.
func checkValue(f *flag.Flag, v string) error {
	g, ok := f.Value.(flag.Getter)
	if !ok {
		return nil // a custom flag: checked when set
	}
	scratch := flag.NewFlagSet("", flag.ContinueOnError)
	switch g.Get().(type) {
	case bool:
		scratch.Bool("x", false, "")
	case int:
		scratch.Int("x", 0, "")
	case int64:
		scratch.Int64("x", 0, "")
	case uint:
		scratch.Uint("x", 0, "")
	case uint64:
		scratch.Uint64("x", 0, "")
	case float64:
		scratch.Float64("x", 0, "")
	case time.Duration:
		scratch.Duration("x", 0, "")
	default:
		return nil
	}
	return scratch.Set("x", v)
}

// decodeConfig parses a configuration file into its settings, in file order.
func decodeConfig(file string, data []byte) (strictyaml.Settings, error) {
	doc, err := strictyaml.Parse(file, data)
	if err != nil {
		return nil, err
	}
	if k := doc.Kind(); k != strictyaml.KindMapping && k != strictyaml.KindNull {
		p := doc.Position()
		return nil, &ConfigError{File: file, Line: p.Line, Column: p.Column, Message: "expected a mapping of flag names to values, got " + k.String()}
	}
	var settings strictyaml.Settings
	if _, err := doc.Decode(&settings, strictyaml.Options{}); err != nil {
		return nil, err
	}
	return settings, nil
}

// StartError reports a daemon's error from parsing its settings on w and returns its exit
// status: 0 for --help (flag.ErrHelp: the usage was printed, which is what was asked), 2 for
// anything else, printed after the daemon's name.
func StartError(w io.Writer, name string, err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(w, "%s: %v\n", name, err)
	return 2
}
