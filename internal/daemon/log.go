package daemon

import (
	"fmt"
	"io"
	"log/slog"
)

// Log formats NewLogger accepts.
const (
	LogText = "text"
	LogJSON = "json"
)

// NewLogger returns a logger writing to w in format (LogText or LogJSON) at level (debug,
// info, warn, error, or a level with an offset such as info+2, as slog.Level parses it). It
// returns an error naming the format or level it does not know.
func NewLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("parsing log level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case LogText:
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case LogJSON:
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("parsing log format %q: want %s or %s", format, LogText, LogJSON)
}

// CheckLogFlags checks a log format and level without making a logger, for flag validation.
func CheckLogFlags(format, level string) error {
	_, err := NewLogger(io.Discard, format, level)
	return err
}

// LogDeprecations logs each of warnings (Flags.Deprecations) once, at start.
func LogDeprecations(log *slog.Logger, warnings []string) {
	for _, w := range warnings {
		log.Warn("Deprecated setting", "warning", w)
	}
}
