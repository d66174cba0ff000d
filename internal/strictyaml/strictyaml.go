// Package strictyaml decodes one YAML document into a Go value strictly, for the files Lethe
// reads from operators and tenants: policy files (package policy) and daemon configuration
// files (package internal/daemon).
//
// Strict means: exactly one document; no unknown field of a struct, no duplicate key, no
// value of the wrong type; no anchors, aliases, tags or merge keys (a reader of the file sees
// every value where it applies). Every problem is an [*Error] naming the file, line and
// column, and decoding goes on after one, so that a file's problems are reported together.
//
// Parsing is goccy/go-yaml's; a panic in it is recovered and reported as malformed YAML, since
// the bytes may be hostile. The package imports nothing but goccy/go-yaml, internal/errtree
// (standard library only) and the standard library, and it must stay that way: policy, a
// leaf package, depends on it.
package strictyaml

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"

	"github.com/lethe-cc/lethe/internal/errtree"
)

// Error is one problem in a YAML document, at a position.
type Error struct {
	File   string
	Line   int // 1-based; 0 if unknown
	Column int // 1-based; 0 if unknown
	// Path is the value the problem is with, such as spec.source.snp.vmpl or trust-roots[1];
	// empty for the document itself.
	Path string
	// Message says what was expected.
	Message string
}

// Error formats e as file:line:col: path: message.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d:%d", e.Line, e.Column)
	}
	b.WriteString(": ")
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Message)
	return b.String()
}

// Errors returns the *Error values in err's tree, in order.
func Errors(err error) []*Error { return errtree.All[*Error](err) }

// Join returns errs sorted by position (stably) and joined with errors.Join; nil if there is
// none.
func Join(errs []*Error) error {
	if len(errs) == 0 {
		return nil
	}
	errs = slices.Clone(errs)
	slices.SortStableFunc(errs, func(a, b *Error) int {
		if a.Line != b.Line {
			return a.Line - b.Line
		}
		return a.Column - b.Column
	})
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = e
	}
	return errors.Join(out...)
}

// Position is where a value starts in a document, 1-based; zero if unknown.
type Position struct {
	Line, Column int
}

// Document is one parsed YAML document. Decoding never changes it, so it may be decoded any
// number of times, concurrently.
type Document struct {
	file string
	body ast.Node // nil for an empty document
}

// Parse parses data as YAML (file names it in errors) and returns its only document. A file
// holding nothing but comments is an empty document. It returns an *Error for malformed YAML
// (a duplicate key among them) and for more than one document.
func Parse(file string, data []byte) (doc *Document, err error) {
	defer func() {
		// The parser reads untrusted bytes; a bug in it must not take the process down.
		if r := recover(); r != nil {
			doc, err = nil, &Error{File: file, Message: fmt.Sprintf("malformed YAML (parser failed: %v)", r)}
		}
	}()
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		e := &Error{File: file, Message: err.Error()}
		if ye, ok := errors.AsType[yaml.Error](err); ok {
			e.Message = "malformed YAML: " + ye.GetMessage()
			if tk := ye.GetToken(); tk != nil && tk.Position != nil {
				e.Line, e.Column = tk.Position.Line, tk.Position.Column
			}
		}
		return nil, e
	}
	var bodies []ast.Node
	for _, d := range f.Docs {
		if d != nil && d.Body != nil {
			bodies = append(bodies, d.Body)
		}
	}
	switch len(bodies) {
	case 0:
		return &Document{file: file}, nil
	case 1:
		return &Document{file: file, body: bodies[0]}, nil
	}
	p := position(bodies[1])
	return nil, &Error{File: file, Line: p.Line, Column: p.Column, Message: fmt.Sprintf("%d YAML documents, expected exactly one", len(bodies))}
}

// Empty reports whether the document holds no value (an empty file, only comments, or an
// explicit null).
func (d *Document) Empty() bool {
	_, null := d.body.(*ast.NullNode)
	return d.body == nil || null
}

// Kind returns the kind of the document's value; KindNull if it is empty.
func (d *Document) Kind() Kind {
	if d.body == nil {
		return KindNull
	}
	return kindOf(d.body)
}

// Position returns where the document's value starts; zero if it is empty.
func (d *Document) Position() Position { return position(d.body) }

// Kind is what a YAML node is.
type Kind int

// The kinds of YAML nodes.
const (
	KindOther Kind = iota
	KindNull
	KindString
	KindInteger
	KindFloat // also .inf and .nan
	KindBool
	KindMapping
	KindList
	KindAnchor
	KindAlias
	KindTag
)

// String names k for "got …" in messages: "a string", "an integer", "a mapping", ….
func (k Kind) String() string {
	switch k {
	case KindNull:
		return "null"
	case KindString:
		return "a string"
	case KindInteger:
		return "an integer"
	case KindFloat:
		return "a number"
	case KindBool:
		return "a boolean"
	case KindMapping:
		return "a mapping"
	case KindList:
		return "a list"
	case KindAnchor:
		return "an anchor"
	case KindAlias:
		return "an alias"
	case KindTag:
		return "a tagged value"
	}
	return "an unexpected node"
}

func kindOf(n ast.Node) Kind {
	switch n.(type) {
	case *ast.NullNode:
		return KindNull
	case *ast.StringNode, *ast.LiteralNode:
		return KindString
	case *ast.IntegerNode:
		return KindInteger
	case *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
		return KindFloat
	case *ast.BoolNode:
		return KindBool
	case *ast.MappingNode, *ast.MappingValueNode:
		return KindMapping
	case *ast.SequenceNode:
		return KindList
	case *ast.AnchorNode:
		return KindAnchor
	case *ast.AliasNode:
		return KindAlias
	case *ast.TagNode:
		return KindTag
	}
	return KindOther
}

// position returns where a node starts, or zero.
func position(n ast.Node) Position {
	switch m := n.(type) {
	case nil:
		return Position{}
	case *ast.MappingNode:
		// A block mapping's token is its first ':'; its first key is where a reader looks.
		if len(m.Values) > 0 && !m.IsFlowStyle {
			return position(m.Values[0])
		}
	case *ast.MappingValueNode:
		return position(m.Key)
	}
	if tk := n.GetToken(); tk != nil && tk.Position != nil {
		return Position{Line: tk.Position.Line, Column: tk.Position.Column}
	}
	return Position{}
}

// Scalar is a scalar as written: for a quoted or block string its value, for anything else
// its text (so that 0x10, 1e3 or yes reach the caller as such).
type Scalar struct {
	Kind Kind
	// Text is empty unless Kind is KindString, KindInteger, KindFloat or KindBool.
	Text string
	Position
}

// scalar returns n as a Scalar; Text is empty for a node that is not a scalar.
func scalar(n ast.Node) Scalar {
	s := Scalar{Kind: kindOf(n), Position: position(n)}
	switch n := n.(type) {
	case *ast.StringNode:
		s.Text = n.Value
	case *ast.LiteralNode:
		s.Text = n.Value.Value
	case *ast.IntegerNode, *ast.FloatNode, *ast.BoolNode, *ast.InfinityNode, *ast.NanNode:
		s.Text = n.GetToken().Value
	}
	return s
}

// Setting is one entry of a flat settings file: a key and its value, a scalar or a list of
// scalars, as written.
type Setting struct {
	Key string
	Position
	// List says the value was written as a list (of Values); otherwise Values holds one.
	List   bool
	Values []Scalar
}

// Settings decodes from a mapping of keys to scalars or lists of scalars, in document order,
// for callers that check the keys and interpret the values themselves (such as a
// configuration file of command-line flags). A null is refused: a setting has a value.
type Settings []Setting
