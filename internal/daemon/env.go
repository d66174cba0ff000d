package daemon

import (
	"errors"
	"flag"
	"fmt"
	"os"
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
}

// setting is what Flags knows of a flag beyond the FlagSet.
type setting struct {
	env string
	// usage is the description without the environment note the flag's usage ends with.
	usage string
	// split, for a repeatable flag, cuts its environment variable into values; nil for others.
	split func(string) []string
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
	if env != "" {
		f.Lookup(name).Usage = usage + " (env " + env + ")"
	}
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
		v := os.Getenv(s.env)
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
				errs = append(errs, fmt.Errorf("environment variable %s: invalid value %q: %w", s.env, x, err))
				return
			}
		}
	})
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return set, nil
}
