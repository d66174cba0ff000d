package daemon

import (
	"os"
	"strconv"
	"time"
)

// The daemons define each flag with its environment variable's value as the default (see
// the package documentation). These read that value.

// Env returns the value of the environment variable name, or def when it is unset. A variable
// set to the empty string gives "".
func Env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

// EnvBool returns the environment variable name as strconv.ParseBool reads it: false when it
// is unset or not a boolean.
func EnvBool(name string) bool {
	v, _ := strconv.ParseBool(os.Getenv(name))
	return v
}

// EnvBoolDefault returns the environment variable name as a boolean, or def when it is unset
// or not a boolean (so that a mistyped value never turns off a check that is on by default).
func EnvBoolDefault(name string, def bool) bool {
	if v, err := strconv.ParseBool(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

// EnvInt returns the environment variable name as an integer, or def when it is unset or not
// an integer.
func EnvInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return n
	}
	return def
}

// EnvDuration returns the environment variable name as a time.Duration (time.ParseDuration),
// or def when it is unset or not a duration.
func EnvDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil {
		return d
	}
	return def
}
