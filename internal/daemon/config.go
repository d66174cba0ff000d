package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// ConfigFlag is the name of the flag that names a daemon's configuration file.
const ConfigFlag = "config"

// MaxConfigSize bounds a configuration file.
const MaxConfigSize = 1 << 20

// ConfigError is a problem in a configuration file, at a position.
type ConfigError struct {
	File   string
	Line   int // 1-based; 0 if unknown
	Column int // 1-based; 0 if unknown
	// Key is the key the problem is with; empty for the file itself.
	Key string
	// Message says what is wrong.
	Message string
}

// Error formats e as file:line:col: key: message.
func (e *ConfigError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d:%d", e.Line, e.Column)
	}
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Message)
	return b.String()
}

// envRE finds the environment variable a flag's usage names.
var envRE = regexp.MustCompile(`\(env ([A-Z][A-Z0-9_]*)`)

// EnvVar returns the environment variable f's usage names ("… (env LETHE_NATS_URL)"), or ""
// for a command-line-only flag.
func EnvVar(f *flag.Flag) string {
	m := envRE.FindStringSubmatch(f.Usage)
	if m == nil {
		return ""
	}
	return m[1]
}

// Parse parses args into fs and then applies the configuration file named by fs's flag
// "config", if fs has one and it is set: each key of the file sets the flag of that name
// unless the command line set it or its environment variable is set. It returns fs.Parse's
// error (flag.ErrHelp included), an error reading the file, or the file's problems as
// *ConfigError values joined with errors.Join.
func Parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	cf := fs.Lookup(ConfigFlag)
	if cf == nil || cf.Value.String() == "" {
		return nil
	}
	path := cf.Value.String()
	data, err := readConfig(path)
	if err != nil {
		return err
	}
	return Apply(fs, path, data)
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

// Apply applies the configuration data (the contents of file) to fs, which has been parsed:
// see Parse. Every problem is returned, as a *ConfigError, joined with errors.Join; flags are
// set only when the whole file is valid.
func Apply(fs *flag.FlagSet, file string, data []byte) error {
	entries, err := decodeConfig(file, data)
	if err != nil {
		return err
	}
	setOnCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { setOnCommandLine[f.Name] = true })

	var errs []error
	type assignment struct {
		f      *flag.Flag
		values []string
		e      entry
	}
	var todo []assignment
	for _, e := range entries {
		f := fs.Lookup(e.key)
		switch {
		case f == nil:
			errs = append(errs, e.fail("unknown key: not a flag of %s", fs.Name()))
			continue
		case f.Name == ConfigFlag:
			errs = append(errs, e.fail("a configuration file cannot name another"))
			continue
		case EnvVar(f) == "":
			errs = append(errs, e.fail("command-line only: give --%s on the command line", f.Name))
			continue
		case e.list && !repeatable(f):
			errs = append(errs, e.fail("expected one value, got a list (only repeatable flags take lists)"))
			continue
		}
		if setOnCommandLine[f.Name] || os.Getenv(EnvVar(f)) != "" {
			continue // the command line and the environment come first
		}
		todo = append(todo, assignment{f: f, values: e.values, e: e})
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// Check every value on a scratch flag set first, so that an invalid file sets nothing.
	for _, a := range todo {
		for i, v := range a.values {
			if err := checkValue(a.f, v); err != nil {
				errs = append(errs, a.e.failAt(i, "invalid value %q: %v", v, err))
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	for _, a := range todo {
		for i, v := range a.values {
			if err := fs.Set(a.f.Name, v); err != nil {
				errs = append(errs, a.e.failAt(i, "invalid value %q: %v", v, err))
			}
		}
	}
	return errors.Join(errs...)
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

// repeatable reports whether f collects the values of repeated flags, which its usage says
// with the word "repeatable".
func repeatable(f *flag.Flag) bool { return strings.Contains(f.Usage, "repeatable") }

// entry is one key of a configuration file with its values.
type entry struct {
	file      string
	key       string
	line, col int
	values    []string
	pos       [][2]int // position of each value
	list      bool
}

func (e entry) fail(format string, args ...any) error {
	return &ConfigError{File: e.file, Line: e.line, Column: e.col, Key: e.key, Message: fmt.Sprintf(format, args...)}
}

func (e entry) failAt(i int, format string, args ...any) error {
	ce := &ConfigError{File: e.file, Line: e.line, Column: e.col, Key: e.key, Message: fmt.Sprintf(format, args...)}
	if i < len(e.pos) && e.pos[i][0] > 0 {
		ce.Line, ce.Column = e.pos[i][0], e.pos[i][1]
	}
	return ce
}

// decodeConfig parses a configuration file into its entries, in file order.
func decodeConfig(file string, data []byte) (entries []entry, err error) {
	defer func() {
		if r := recover(); r != nil {
			entries, err = nil, &ConfigError{File: file, Message: fmt.Sprintf("malformed YAML (parser failed: %v)", r)}
		}
	}()
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		ce := &ConfigError{File: file, Message: err.Error()}
		if ye, ok := errors.AsType[yaml.Error](err); ok {
			ce.Message = "malformed YAML: " + ye.GetMessage()
			if tk := ye.GetToken(); tk != nil && tk.Position != nil {
				ce.Line, ce.Column = tk.Position.Line, tk.Position.Column
			}
		}
		return nil, ce
	}
	var bodies []ast.Node
	for _, doc := range f.Docs {
		if doc != nil && doc.Body != nil {
			bodies = append(bodies, doc.Body)
		}
	}
	switch len(bodies) {
	case 0:
		return nil, nil // an empty file (or only comments) sets nothing
	case 1:
	default:
		line, col := position(bodies[1])
		return nil, &ConfigError{File: file, Line: line, Column: col, Message: fmt.Sprintf("%d YAML documents, expected one", len(bodies))}
	}
	var values []*ast.MappingValueNode
	switch m := bodies[0].(type) {
	case *ast.MappingNode:
		values = m.Values
	case *ast.MappingValueNode:
		values = []*ast.MappingValueNode{m}
	case *ast.NullNode:
		return nil, nil
	default:
		line, col := position(bodies[0])
		return nil, &ConfigError{File: file, Line: line, Column: col, Message: "expected a mapping of flag names to values, got " + describe(bodies[0])}
	}
	var errs []error
	seen := map[string]bool{}
	for _, mv := range values {
		line, col := position(mv.Key)
		k, ok := mv.Key.(*ast.StringNode)
		if !ok {
			errs = append(errs, &ConfigError{File: file, Line: line, Column: col, Message: "expected a flag name, got " + describe(mv.Key)})
			continue
		}
		e := entry{file: file, key: k.Value, line: line, col: col}
		if seen[k.Value] {
			errs = append(errs, e.fail("duplicate key"))
			continue
		}
		seen[k.Value] = true
		if seq, ok := mv.Value.(*ast.SequenceNode); ok {
			e.list = true
			for _, item := range seq.Values {
				v, err := scalar(e, item)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				l, c := position(item)
				e.values, e.pos = append(e.values, v), append(e.pos, [2]int{l, c})
			}
		} else {
			v, err := scalar(e, mv.Value)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			l, c := position(mv.Value)
			e.values, e.pos = []string{v}, [][2]int{{l, c}}
		}
		entries = append(entries, e)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return entries, nil
}

// scalar returns a scalar node's text as written (so that 0x10 or 1e3 reach the flag as
// such), or an error for anything else.
func scalar(e entry, n ast.Node) (string, error) {
	switch n := n.(type) {
	case *ast.StringNode:
		return n.Value, nil
	case *ast.LiteralNode:
		return n.Value.Value, nil
	case *ast.IntegerNode, *ast.FloatNode, *ast.BoolNode, *ast.InfinityNode, *ast.NanNode:
		return n.GetToken().Value, nil
	}
	line, col := position(n)
	msg := "expected a value, got " + describe(n)
	switch n.(type) {
	case *ast.NullNode:
		msg = `no value (write "" for an empty one)`
		line, col = e.line, e.col // an implicit null has no place of its own
	case *ast.AnchorNode, *ast.AliasNode, *ast.TagNode:
		msg = "expected a plain value, got " + describe(n) + " (anchors, aliases and tags are not allowed)"
	}
	return "", &ConfigError{File: e.file, Line: line, Column: col, Key: e.key, Message: msg}
}

// position returns where a node starts, 1-based, or zeros.
func position(n ast.Node) (line, col int) {
	switch m := n.(type) {
	case nil:
		return 0, 0
	case *ast.MappingNode:
		if len(m.Values) > 0 && !m.IsFlowStyle {
			return position(m.Values[0])
		}
	case *ast.MappingValueNode:
		return position(m.Key)
	}
	if tk := n.GetToken(); tk != nil && tk.Position != nil {
		return tk.Position.Line, tk.Position.Column
	}
	return 0, 0
}

// describe names a node's kind for messages.
func describe(n ast.Node) string {
	switch n.(type) {
	case *ast.NullNode:
		return "null"
	case *ast.MappingNode, *ast.MappingValueNode:
		return "a mapping"
	case *ast.SequenceNode:
		return "a list"
	case *ast.AnchorNode:
		return "an anchor"
	case *ast.AliasNode:
		return "an alias"
	case *ast.TagNode:
		return "a tagged value"
	case *ast.StringNode, *ast.LiteralNode:
		return "a string"
	}
	return strings.ToLower(n.Type().String())
}
