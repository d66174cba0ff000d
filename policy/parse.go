package policy

import (
	"encoding"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
	"github.com/goccy/go-yaml/token"

	"github.com/lethe-cc/lethe/attest"
)

// MaxSize is the largest policy file Parse accepts.
const MaxSize = 256 << 10

// ParseError is one problem in a policy file, at a position.
type ParseError struct {
	File   string
	Line   int // 1-based; 0 if unknown
	Column int // 1-based; 0 if unknown
	// Path is the field, such as spec.source.snp.vmpl; empty for the document itself.
	Path string
	// Message says what was expected.
	Message string
}

// Error formats e as file:line:col: path: message.
func (e *ParseError) Error() string {
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

// ParseErrors returns the ParseErrors in err's tree, in order.
func ParseErrors(err error) []*ParseError {
	var out []*ParseError
	var walk func(error)
	walk = func(err error) {
		switch e := err.(type) {
		case nil:
		case *ParseError:
			out = append(out, e)
		case interface{ Unwrap() []error }:
			for _, x := range e.Unwrap() {
				walk(x)
			}
		case interface{ Unwrap() error }:
			walk(e.Unwrap())
		}
	}
	walk(err)
	return out
}

// Parse reads a policy from b; file names it in errors. Every problem found is returned as a
// *ParseError joined with errors.Join (see ParseErrors); the policy is returned only when
// there is none. The CEL expression, if any, is compiled and type-checked here.
func Parse(file string, b []byte) (*Policy, error) {
	if len(b) > MaxSize {
		return nil, &ParseError{File: file, Message: fmt.Sprintf("%d bytes, expected at most %d", len(b), MaxSize)}
	}
	d := &decoder{file: file, pos: map[string]token.Position{}}
	spec, err := decodeDefaults()
	if err != nil {
		return nil, fmt.Errorf("decoding defaults: %w", err)
	}
	p := &Policy{Spec: spec}
	body, err := parseDocument(file, b)
	if err != nil {
		return nil, err
	}
	d.decode("", body, reflect.ValueOf(p).Elem(), 0)
	d.validate(p)
	if p.Spec.CEL != "" && len(p.Spec.CEL) <= maxCELSize {
		prg, err := compileCEL(p.Spec.CEL)
		if err != nil {
			d.fail("spec.cel", "%v", err)
		}
		p.cel = prg
	}
	if len(d.errs) > 0 {
		return nil, d.err()
	}
	p.raw = slices.Clone(b)
	return p, nil
}

// parseDocument parses b as YAML and returns the body of its only document.
func parseDocument(file string, b []byte) (n ast.Node, err error) {
	defer func() {
		// The parser reads untrusted bytes; a bug in it must not take the process down.
		if r := recover(); r != nil {
			err = &ParseError{File: file, Message: fmt.Sprintf("malformed YAML (parser failed: %v)", r)}
		}
	}()
	f, err := parser.ParseBytes(b, 0)
	if err != nil {
		pe := &ParseError{File: file, Message: err.Error()}
		if ye, ok := errors.AsType[yaml.Error](err); ok {
			pe.Message = "malformed YAML: " + ye.GetMessage()
			if tk := ye.GetToken(); tk != nil && tk.Position != nil {
				pe.Line, pe.Column = tk.Position.Line, tk.Position.Column
			}
		}
		return nil, pe
	}
	var bodies []ast.Node
	for _, doc := range f.Docs {
		if doc != nil && doc.Body != nil {
			bodies = append(bodies, doc.Body)
		}
	}
	switch len(bodies) {
	case 0:
		return nil, &ParseError{File: file, Line: 1, Column: 1, Message: "empty document, expected a MigrationPolicy"}
	case 1:
		return bodies[0], nil
	}
	pe := &ParseError{File: file, Message: fmt.Sprintf("%d YAML documents, expected exactly one", len(bodies))}
	pe.Line, pe.Column = position(bodies[1])
	return nil, pe
}

// defaultsBody is DefaultsYAML parsed once; decoding it (which never changes it) gives every
// policy its own copy of the defaults.
var defaultsBody = sync.OnceValues(func() (ast.Node, error) { return parseDocument("defaults.yaml", DefaultsYAML) })

func decodeDefaults() (Spec, error) {
	body, err := defaultsBody()
	if err != nil {
		return Spec{}, err
	}
	var doc struct {
		Spec Spec `yaml:"spec"`
	}
	d := &decoder{file: "defaults.yaml", pos: map[string]token.Position{}}
	d.decode("", body, reflect.ValueOf(&doc).Elem(), 0)
	if len(d.errs) > 0 {
		return Spec{}, d.err()
	}
	return doc.Spec, nil
}

// decoder decodes an AST into a Go value strictly, collecting every error with its position.
type decoder struct {
	file string
	errs []*ParseError
	// pos holds the position of every decoded path, for errors found after decoding.
	pos map[string]token.Position
}

// err returns the errors in the order of their positions.
func (d *decoder) err() error {
	slices.SortStableFunc(d.errs, func(a, b *ParseError) int {
		if a.Line != b.Line {
			return a.Line - b.Line
		}
		return a.Column - b.Column
	})
	errs := make([]error, len(d.errs))
	for i, e := range d.errs {
		errs[i] = e
	}
	return errors.Join(errs...)
}

func (d *decoder) failAt(n ast.Node, path, format string, args ...any) {
	e := &ParseError{File: d.file, Path: path, Message: fmt.Sprintf(format, args...)}
	e.Line, e.Column = position(n)
	d.errs = append(d.errs, e)
}

// fail reports an error at path's position, or at its closest decoded parent's.
func (d *decoder) fail(path, format string, args ...any) {
	for _, e := range d.errs {
		if e.Path == path {
			return // one error a field: the decoder has said what was expected
		}
	}
	e := &ParseError{File: d.file, Path: path, Message: fmt.Sprintf(format, args...)}
	for p := path; ; {
		if pos, ok := d.pos[p]; ok {
			e.Line, e.Column = pos.Line, pos.Column
			break
		}
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			if pos, ok := d.pos[""]; ok {
				e.Line, e.Column = pos.Line, pos.Column
			}
			break
		}
		p = p[:i]
	}
	d.errs = append(d.errs, e)
}

func position(n ast.Node) (line, col int) {
	switch m := n.(type) {
	case nil:
		return 0, 0
	case *ast.MappingNode:
		// A block mapping's token is its first ':'; its first key is where a reader looks.
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

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

// describe names a node's kind for "got …" in messages.
func describe(n ast.Node) string {
	switch n := n.(type) {
	case *ast.NullNode:
		return "null"
	case *ast.StringNode, *ast.LiteralNode:
		return "a string"
	case *ast.IntegerNode:
		return "an integer"
	case *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
		return "a number"
	case *ast.BoolNode:
		return "a boolean"
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
	default:
		return strings.ToLower(n.Type().String())
	}
}

var (
	durationType = reflect.TypeFor[time.Duration]()
	hexType      = reflect.TypeFor[attest.HexBytes]()
	textType     = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// maxDepth bounds nesting; a policy is at most a few levels deep.
const maxDepth = 16

// decode decodes n into v. hexLen is the byte length a hex string must decode to (from the
// field's hex tag), 0 if any.
func (d *decoder) decode(path string, n ast.Node, v reflect.Value, hexLen int) {
	if _, ok := d.pos[path]; !ok {
		if line, col := position(n); line > 0 {
			d.pos[path] = token.Position{Line: line, Column: col}
		}
	}
	if strings.Count(path, ".")+strings.Count(path, "[") > maxDepth {
		d.failAt(n, path, "nested too deeply")
		return
	}
	switch n.(type) {
	case *ast.AnchorNode, *ast.AliasNode, *ast.TagNode, *ast.MergeKeyNode:
		d.failAt(n, path, "expected plain YAML, got %s (anchors, aliases and tags are not allowed in policies)", describe(n))
		return
	}
	t := v.Type()
	switch {
	case t == durationType:
		s, ok := d.scalarString(path, n, "a duration such as 10m or 90s")
		if !ok {
			return
		}
		dur, err := time.ParseDuration(s)
		if err != nil {
			d.failAt(n, path, "expected a duration such as 10m or 90s, got %q", s)
			return
		}
		v.SetInt(int64(dur))
		return
	case t == hexType:
		d.decodeHex(path, n, v, hexLen)
		return
	case reflect.PointerTo(t).Implements(textType) && t.Kind() != reflect.Struct:
		s, ok := d.scalarString(path, n, "a string")
		if !ok {
			return
		}
		if err := v.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(s)); err != nil {
			d.failAt(n, path, "%v", err)
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		d.decodeStruct(path, n, v)
	case reflect.Pointer:
		if _, null := n.(*ast.NullNode); null {
			v.SetZero()
			return
		}
		elem := reflect.New(t.Elem())
		d.decode(path, n, elem.Elem(), hexLen)
		v.Set(elem)
	case reflect.Slice:
		seq, ok := n.(*ast.SequenceNode)
		if !ok {
			d.failAt(n, path, "expected a list, got %s", describe(n))
			return
		}
		out := reflect.MakeSlice(t, len(seq.Values), len(seq.Values))
		for i, item := range seq.Values {
			d.decode(fmt.Sprintf("%s[%d]", path, i), item, out.Index(i), hexLen)
		}
		v.Set(out)
	case reflect.Map:
		values, ok := mappingValues(n)
		if !ok {
			d.failAt(n, path, "expected a mapping, got %s", describe(n))
			return
		}
		out := reflect.MakeMap(t)
		seen := map[string]bool{}
		for _, mv := range values {
			key, ok := d.key(path, mv, seen)
			if !ok {
				continue
			}
			elem := reflect.New(t.Elem()).Elem()
			d.decode(join(path, key), mv.Value, elem, hexLen)
			out.SetMapIndex(reflect.ValueOf(key), elem)
		}
		v.Set(out)
	case reflect.String:
		switch n := n.(type) {
		case *ast.StringNode:
			v.SetString(n.Value)
		case *ast.LiteralNode:
			v.SetString(n.Value.Value)
		default:
			d.failAt(n, path, "expected a string, got %s", describe(n))
		}
	case reflect.Bool:
		b, ok := n.(*ast.BoolNode)
		if !ok {
			d.failAt(n, path, "expected true or false, got %s", describe(n))
			return
		}
		v.SetBool(b.Value)
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		maxV := uint64(math.MaxUint64) >> (64 - t.Bits())
		want := fmt.Sprintf("an integer from 0 to %d", maxV)
		in, ok := n.(*ast.IntegerNode)
		if !ok {
			d.failAt(n, path, "expected %s, got %s", want, describe(n))
			return
		}
		var u uint64
		switch x := in.Value.(type) {
		case int64:
			if x < 0 {
				d.failAt(n, path, "expected %s, got %d", want, x)
				return
			}
			u = uint64(x)
		case uint64:
			u = x
		default:
			d.failAt(n, path, "expected %s, got %s", want, in.Token.Value)
			return
		}
		if v.OverflowUint(u) {
			d.failAt(n, path, "expected %s, got %d", want, u)
			return
		}
		v.SetUint(u)
	default:
		d.failAt(n, path, "cannot decode into %v", t)
	}
}

// scalarString returns the text of a string scalar.
func (d *decoder) scalarString(path string, n ast.Node, want string) (string, bool) {
	switch n := n.(type) {
	case *ast.StringNode:
		return n.Value, true
	case *ast.LiteralNode:
		return n.Value.Value, true
	}
	d.failAt(n, path, "expected %s, got %s", want, describe(n))
	return "", false
}

// decodeHex decodes a hex string of hexLen bytes (any length if 0). It reads the scalar's
// text as written, so that a hex string of digits only is not taken for a number.
func (d *decoder) decodeHex(path string, n ast.Node, v reflect.Value, hexLen int) {
	want := "a hex string"
	if hexLen > 0 {
		want = fmt.Sprintf("%d bytes as %d hex digits", hexLen, 2*hexLen)
	}
	var s string
	switch n := n.(type) {
	case *ast.StringNode:
		s = n.Value
	case *ast.IntegerNode, *ast.FloatNode:
		s = n.GetToken().Value
	case *ast.NullNode:
		v.SetZero()
		return
	default:
		d.failAt(n, path, "expected %s, got %s", want, describe(n))
		return
	}
	s = strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
	b, err := hex.DecodeString(s)
	if err != nil {
		d.failAt(n, path, "expected %s, got %q (not hex)", want, s)
		return
	}
	if hexLen > 0 && len(b) != hexLen {
		d.failAt(n, path, "expected %s, got %s", want, plural(len(b), "byte"))
		return
	}
	v.Set(reflect.ValueOf(attest.HexBytes(b)))
}

func plural(n int, unit string) string {
	if n == 1 {
		return "1 " + unit
	}
	return fmt.Sprintf("%d %ss", n, unit)
}

// key returns a mapping entry's key, reporting non-string and duplicate keys.
func (d *decoder) key(path string, mv *ast.MappingValueNode, seen map[string]bool) (string, bool) {
	if _, ok := mv.Key.(*ast.MergeKeyNode); ok {
		d.failAt(mv.Key, path, "merge keys (<<) are not allowed in policies")
		return "", false
	}
	k, ok := mv.Key.(*ast.StringNode)
	if !ok {
		d.failAt(mv.Key, path, "expected a field name, got %s", describe(mv.Key))
		return "", false
	}
	if seen[k.Value] {
		d.failAt(mv.Key, join(path, k.Value), "duplicate field")
		return "", false
	}
	seen[k.Value] = true
	return k.Value, true
}

// mappingValues returns the entries of a mapping node; null is an empty mapping.
func mappingValues(n ast.Node) ([]*ast.MappingValueNode, bool) {
	switch m := n.(type) {
	case *ast.MappingNode:
		return m.Values, true
	case *ast.MappingValueNode:
		return []*ast.MappingValueNode{m}, true
	case *ast.NullNode:
		return nil, true
	}
	return nil, false
}

type structField struct {
	index  []int
	hexLen int
}

// fieldsOf maps a struct's YAML field names to its fields, flattening ",inline" fields.
func fieldsOf(t reflect.Type) (map[string]structField, []string) {
	fields := map[string]structField{}
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if opts == "inline" {
			inner, innerNames := fieldsOf(f.Type)
			for _, n := range innerNames {
				sf := inner[n]
				sf.index = append([]int{i}, sf.index...)
				fields[n] = sf
			}
			names = append(names, innerNames...)
			continue
		}
		if name == "" || name == "-" {
			continue
		}
		hexLen, _ := strconv.Atoi(f.Tag.Get("hex"))
		fields[name] = structField{index: []int{i}, hexLen: hexLen}
		names = append(names, name)
	}
	return fields, names
}

func (d *decoder) decodeStruct(path string, n ast.Node, v reflect.Value) {
	if _, null := n.(*ast.NullNode); null {
		return // an empty section keeps its defaults
	}
	values, ok := mappingValues(n)
	if !ok {
		d.failAt(n, path, "expected a mapping, got %s", describe(n))
		return
	}
	fields, names := fieldsOf(v.Type())
	seen := map[string]bool{}
	for _, mv := range values {
		key, ok := d.key(path, mv, seen)
		if !ok {
			continue
		}
		f, ok := fields[key]
		if !ok {
			d.failAt(mv.Key, join(path, key), "unknown field, expected one of %s", strings.Join(names, ", "))
			continue
		}
		d.decode(join(path, key), mv.Value, v.FieldByIndex(f.index), f.hexLen)
	}
}

// name is the alphabet of tenant and policy names: they become parts of Vault key names.
var name = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// guestPattern is a guest selector: a VM name (the keybroker's alphabet of VM names), such a
// name's prefix followed by '*', or '*' alone.
var guestPattern = regexp.MustCompile(`^(\*|[a-z0-9][a-z0-9._-]{0,62}|[a-z0-9][a-z0-9._-]{0,61}\*)$`)

const guestWant = "a VM name (lowercase letters, digits, '.', '_' and '-'), a prefix of one followed by '*', or '*'"

const nameWant = "1 to 63 lowercase letters, digits and dashes, starting and ending with a letter or digit"

// validate checks what the types alone do not.
func (d *decoder) validate(p *Policy) {
	if p.APIVersion != APIVersion {
		d.fail("apiVersion", "expected %q, got %q", APIVersion, p.APIVersion)
	}
	if p.Kind != Kind {
		d.fail("kind", "expected %q, got %q", Kind, p.Kind)
	}
	if !name.MatchString(p.Metadata.Tenant) {
		d.fail("metadata.tenant", "expected %s, got %q", nameWant, p.Metadata.Tenant)
	}
	if !name.MatchString(p.Metadata.Name) {
		d.fail("metadata.name", "expected %s, got %q", nameWant, p.Metadata.Name)
	}
	if _, ok := d.pos["metadata.policySvn"]; !ok {
		d.fail("metadata.policySvn", "expected an integer from 0 to %d, got nothing", uint64(math.MaxUint64))
	}
	for i, g := range p.Spec.Guests {
		path := fmt.Sprintf("spec.guests[%d]", i)
		switch {
		case !guestPattern.MatchString(g):
			d.fail(path, "expected %s, got %q", guestWant, g)
		case slices.Index(p.Spec.Guests, g) != i:
			d.fail(path, "duplicate guest pattern %q", g)
		}
	}
	d.validateEnd("spec.source", p.Spec.Source)
	dst := p.Spec.Destination
	d.validateEnd("spec.destination", dst.EndRequirements)
	for k, val := range dst.HostLabels {
		if k == "" {
			d.fail("spec.destination.hostLabels", "expected non-empty label names")
		}
		if strings.ContainsAny(k, "=,") || strings.ContainsAny(val, ",") {
			d.fail(join("spec.destination.hostLabels", k), "expected a label without '=' or ',' in its name and ',' in its value")
		}
	}
	for i, r := range dst.Regions {
		if r == "" {
			d.fail(fmt.Sprintf("spec.destination.regions[%d]", i), "expected a region name, got an empty string")
		}
	}
	if len(p.Spec.Transport.CipherSuites) == 0 {
		d.fail("spec.transport.cipherSuites", "expected at least one of %s", strings.Join(CipherSuites, ", "))
	}
	for i, s := range p.Spec.Transport.CipherSuites {
		if !slices.Contains(CipherSuites, s) {
			d.fail(fmt.Sprintf("spec.transport.cipherSuites[%d]", i), "expected one of %s, got %q", strings.Join(CipherSuites, ", "), s)
		}
	}
	if dl := p.Spec.Erasure.Deadline; dl < time.Second || dl > 24*time.Hour {
		d.fail("spec.erasure.deadline", "expected a duration from 1s to 24h, got %v", dl)
	}
	if len(p.Spec.CEL) > maxCELSize {
		d.fail("spec.cel", "expected at most %d bytes, got %d", maxCELSize, len(p.Spec.CEL))
	}
}

func (d *decoder) validateEnd(path string, e EndRequirements) {
	if len(e.Platforms) == 0 {
		d.fail(join(path, "platforms"), "expected at least one platform (sev-snp, tdx, emulated-sev-snp, emulated-tdx)")
	}
	for i, pl := range e.Platforms {
		if slices.Index(e.Platforms, pl) != i {
			d.fail(fmt.Sprintf("%s.platforms[%d]", path, i), "duplicate platform %v", pl)
		}
	}
	for i, pr := range e.SNP.Products {
		if !slices.Contains(SNPProducts, pr) {
			d.fail(fmt.Sprintf("%s.snp.products[%d]", path, i), "expected one of %s, got %q", strings.Join(SNPProducts, ", "), pr)
		}
	}
	if e.SNP.VMPL != nil && *e.SNP.VMPL > 3 {
		d.fail(join(path, "snp.vmpl"), "expected an integer from 0 to 3, got %d", *e.SNP.VMPL)
	}
}
