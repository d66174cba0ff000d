package daemon

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"
)

// Flags are a daemon's settings. Each is declared once, with its flag name, its environment
// variable, its default, its description and where its value goes; that makes it a flag of
// the embedded FlagSet, an environment variable Parse reads, a key of the configuration file
// and a row of the configuration reference. A setting declared with no environment variable
// is a flag of the command line only (an action such as --export-pub), and so is a flag
// defined on the FlagSet directly.
type Flags struct {
	*flag.FlagSet
	settings map[string]setting
	// deprecated lists the deprecated environment variables Parse read, one warning each.
	deprecated []string
	// set holds the flags the command line, the environment or the file set, after Parse.
	set map[string]bool
}

// setting is what Flags knows of a flag beyond the FlagSet.
type setting struct {
	env string
	// usage is the description without the environment note the flag's usage ends with.
	usage string
	// split, for a repeatable flag, cuts its environment variable into values; nil for others.
	split func(string) []string
	// aliases are former names of env, still read (after env) with a deprecation warning.
	aliases []string
	// secret: env+"_FILE" names a file holding the value (for passwords and tokens).
	secret bool
}

// NewFlags returns the empty settings of the daemon name. Its FlagSet returns errors (so that
// the daemon says which setting is wrong and exits).
func NewFlags(name string) *Flags {
	return &Flags{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), settings: map[string]setting{}}
}

// declare records the setting of the flag name just defined and puts the environment note at
// the end of its usage, as the help shows it.
func (f *Flags) declare(name, env, usage string, split func(string) []string) {
	f.settings[name] = setting{env: env, usage: usage, split: split}
	f.note(name)
}

// note puts the environment note at the end of the usage of the flag name.
func (f *Flags) note(name string) {
	s := f.settings[name]
	if s.env == "" {
		return
	}
	n := s.env
	if s.secret {
		n += " or " + s.env + "_FILE"
	}
	f.Lookup(name).Usage = s.usage + " (env " + n + ")"
}

// String declares a string setting: the flag name, the environment variable env ("" for the
// command line only), the default def and the description usage. Its value goes to p.
func (f *Flags) String(p *string, name, env, def, usage string) {
	f.StringVar(p, name, def, usage)
	f.declare(name, env, usage, nil)
}

// Bool declares a boolean setting; see String.
func (f *Flags) Bool(p *bool, name, env string, def bool, usage string) {
	f.BoolVar(p, name, def, usage)
	f.declare(name, env, usage, nil)
}

// Int declares an integer setting; see String.
func (f *Flags) Int(p *int, name, env string, def int, usage string) {
	f.IntVar(p, name, def, usage)
	f.declare(name, env, usage, nil)
}

// Uint64 declares an unsigned integer setting; see String.
func (f *Flags) Uint64(p *uint64, name, env string, def uint64, usage string) {
	f.Uint64Var(p, name, def, usage)
	f.declare(name, env, usage, nil)
}

// Duration declares a time.Duration setting (as time.ParseDuration reads it); see String.
func (f *Flags) Duration(p *time.Duration, name, env string, def time.Duration, usage string) {
	f.DurationVar(p, name, def, usage)
	f.declare(name, env, usage, nil)
}

// Secret declares a string setting that holds a secret (a password): besides env, the
// variable env+"_FILE" names a file whose contents, without a trailing newline, are the
// value, so that the secret need not be in the environment (systemd credentials, Docker and
// Kubernetes secrets). See String.
func (f *Flags) Secret(p *string, name, env, usage string) {
	f.String(p, name, env, "", usage)
	s := f.settings[name]
	s.secret = env != ""
	f.settings[name] = s
	f.note(name)
}

// Alias makes old, a former environment variable of the flag name, still set it when the
// current one is unset; Parse records a deprecation warning (Deprecations) when it does.
// It panics if name is not a setting with an environment variable: a programming error.
func (f *Flags) Alias(name, old string) {
	s, ok := f.settings[name]
	if !ok || s.env == "" {
		panic("daemon: alias of " + name + ", which has no environment variable")
	}
	s.aliases = append(s.aliases, old)
	f.settings[name] = s
}

// Namespace renames the environment variable of every setting that is not under prefix
// (such as "LETHE_BROKER_") to prefix followed by its name without "LETHE_", so that
// LETHE_LEASE becomes LETHE_BROKER_LEASE, and keeps the former name as an alias (Alias)
// unless it is one of retired, which are no longer read at all (LETHE_NATS_URL is lethectl's:
// a daemon that read it would follow a variable meant for the CLI). Call it after declaring
// every setting.
func (f *Flags) Namespace(prefix string, retired ...string) {
	for name, s := range f.settings {
		if s.env == "" || strings.HasPrefix(s.env, prefix) {
			continue
		}
		old := s.env
		s.env = prefix + strings.TrimPrefix(old, "LETHE_")
		if !slices.Contains(retired, old) {
			s.aliases = append(s.aliases, old)
		}
		f.settings[name] = s
		f.note(name)
	}
}

// Aliases returns the deprecated environment variables of the flag name, which Parse still
// reads.
func (f *Flags) Aliases(name string) []string { return slices.Clone(f.settings[name].aliases) }

// Deprecations returns a warning per deprecated environment variable Parse read, naming its
// replacement, for the daemon to log once at start.
func (f *Flags) Deprecations() []string { return slices.Clone(f.deprecated) }

// IsSet reports whether the command line, the environment or the configuration file set the
// flag name (as opposed to its default), after Parse.
func (f *Flags) IsSet(name string) bool { return f.set[name] }

// List declares a repeatable setting: v collects the values of the repeated flag, of the
// list the configuration file gives, or of its environment variable cut by split (such as
// strings.Fields or filepath.SplitList). Its default is what v holds.
func (f *Flags) List(v flag.Value, name, env string, split func(string) []string, usage string) {
	f.Var(v, name, usage)
	f.declare(name, env, usage, split)
}

// EnvVar returns the environment variable of the flag name; "" for a flag of the command
// line only.
func (f *Flags) EnvVar(name string) string { return f.settings[name].env }

// Description returns the description of the flag name, without its environment note.
func (f *Flags) Description(name string) string {
	if s, ok := f.settings[name]; ok {
		return s.usage
	}
	if fl := f.Lookup(name); fl != nil {
		return fl.Usage
	}
	return ""
}

// Repeatable reports whether the flag name was declared with List.
func (f *Flags) Repeatable(name string) bool { return f.settings[name].split != nil }

// applyEnv sets every flag that the command line did not set and whose environment variable
// is set (to something other than ""), and returns the names of the flags set from the
// command line or the environment. An environment variable the flag refuses is an error that
// names it.
func (f *Flags) applyEnv() (map[string]bool, error) {
	set := map[string]bool{}
	f.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	var errs []error
	f.VisitAll(func(fl *flag.Flag) {
		s := f.settings[fl.Name]
		if set[fl.Name] || s.env == "" {
			return
		}
		v, from, err := f.lookupEnv(s)
		if err != nil {
			errs = append(errs, err)
			return
		}
		if v == "" {
			return
		}
		set[fl.Name] = true
		values := []string{v}
		if s.split != nil {
			values = s.split(v)
		}
		for _, x := range values {
			if err := f.Set(fl.Name, x); err != nil {
				if s.secret {
					x = "(hidden)" // never print a secret
				}
				errs = append(errs, fmt.Errorf("environment variable %s: invalid value %q: %w", from, x, err))
				return
			}
		}
	})
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return set, nil
}

// lookupEnv returns the value of the setting s from the environment and the variable it came
// from: its variable, else (for a secret) the file its _FILE variable names, else its first
// alias that is set, recording a deprecation warning. Both a secret's variable and its
// _FILE variable set is an error, as is a _FILE variable whose file cannot be read.
func (f *Flags) lookupEnv(s setting) (value, from string, err error) {
	v := os.Getenv(s.env)
	if s.secret {
		file := os.Getenv(s.env + "_FILE")
		switch {
		case file != "" && v != "":
			return "", "", fmt.Errorf("environment variables %s and %s_FILE are both set: give one", s.env, s.env)
		case file != "":
			data, err := os.ReadFile(file)
			if err != nil {
				return "", "", fmt.Errorf("environment variable %s_FILE: reading the secret: %w", s.env, err)
			}
			return strings.TrimRight(string(data), "\r\n"), s.env + "_FILE", nil
		}
	}
	if v != "" {
		return v, s.env, nil
	}
	for _, old := range s.aliases {
		if v := os.Getenv(old); v != "" {
			f.deprecated = append(f.deprecated, fmt.Sprintf("environment variable %s is deprecated: use %s", old, s.env))
			return v, old, nil
		}
	}
	return "", "", nil
}
