package strictyaml

import (
	"encoding"
	"fmt"
	"math"
	"reflect"
	"strings"
	"time"

	"github.com/goccy/go-yaml/ast"
)

// ScalarFunc decodes a value of a type the decoder does not know, such as a hex string of a
// length given by a struct tag. s is what was written where the value is: any kind but an
// anchor, alias or tag, which the decoder refuses itself, so the function says what it
// expected when s is of the wrong kind. tag is the tag of the struct field that holds the
// value, directly or through pointers, lists and maps (empty outside a struct field). It
// returns the value, of the type it decodes (nil for the zero value), or an error whose text
// is the message of an *Error at s.
type ScalarFunc func(s Scalar, tag reflect.StructTag) (any, error)

// Options tune Decode.
type Options struct {
	// Scalars decodes the types it names, before any rule of Decode applies to them.
	Scalars map[reflect.Type]ScalarFunc
}

// Positions holds where the value of each decoded path starts: "" for the document,
// "spec.source" for a field, "spec.guests[2]" for a list item, "hostLabels.zone" for a map
// entry.
type Positions map[string]Position

// Of returns the position of path's value, or failing that of its closest decoded parent
// ("a.b[2]", then "a.b", "a", ""); ok says whether path itself was decoded.
func (p Positions) Of(path string) (pos Position, ok bool) {
	if pos, ok := p[path]; ok {
		return pos, true
	}
	for {
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			return p[""], false
		}
		path = path[:i]
		if pos, ok := p[path]; ok {
			return pos, false
		}
	}
}

// maxDepth bounds nesting, so that hostile input cannot exhaust the stack.
const maxDepth = 16

var (
	durationType = reflect.TypeFor[time.Duration]()
	settingsType = reflect.TypeFor[Settings]()
	textType     = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// Decode decodes the document into v, a non-nil pointer, and returns the positions of what it
// decoded, for errors the caller finds later. Every problem is an *Error; they are returned
// sorted by position and joined with errors.Join (see Errors). v may be partly set when there
// are problems.
//
// Decoding starts from v's current value, so that v can hold defaults: a field the document
// does not name keeps its value, and so does a struct written as null (an empty section).
// The Go types decoded, after the types of opts.Scalars, are:
//
//   - a struct from a mapping of its fields' names (the name in the field's yaml tag; a field
//     without one is not decoded; ",inline" decodes the fields of an embedded struct as the
//     struct's own); an unknown or repeated field is refused;
//   - a pointer from null (nil) or from what its element decodes from;
//   - a slice from a list; a map with string keys from a mapping, or from null (empty);
//   - a string from a string; a bool from true or false; an integer type from an integer in
//     its range;
//   - a time.Duration from a string that time.ParseDuration reads, such as 10m or 90s;
//   - any other type implementing encoding.TextUnmarshaler, but a struct, from a string;
//   - Settings from a mapping of keys to scalars or lists of scalars.
func (d *Document) Decode(v any, opts Options) (Positions, error) {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		return nil, fmt.Errorf("decoding %s: want a non-nil pointer, got %T", d.file, v)
	}
	dec := &decoder{file: d.file, opts: opts, pos: Positions{}}
	if d.body != nil {
		dec.decode("", d.body, rv.Elem(), "", 0)
	}
	return dec.pos, Join(dec.errs)
}

// decoder decodes an AST into a Go value, collecting every error with its position.
type decoder struct {
	file string
	opts Options
	errs []*Error
	pos  Positions
}

func (d *decoder) failAt(p Position, path, format string, args ...any) {
	d.errs = append(d.errs, &Error{File: d.file, Line: p.Line, Column: p.Column, Path: path, Message: fmt.Sprintf(format, args...)})
}

func (d *decoder) fail(n ast.Node, path, format string, args ...any) {
	d.failAt(position(n), path, format, args...)
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

// plain refuses anchors, aliases, tags and merge keys; it reports whether n is none of them.
func (d *decoder) plain(n ast.Node, path string) bool {
	switch n.(type) {
	case *ast.AnchorNode, *ast.AliasNode, *ast.TagNode, *ast.MergeKeyNode:
		d.fail(n, path, "expected plain YAML, got %s (anchors, aliases and tags are not allowed)", kindOf(n))
		return false
	}
	return true
}

// decode decodes n into v; tag is the tag of the struct field v belongs to.
func (d *decoder) decode(path string, n ast.Node, v reflect.Value, tag reflect.StructTag, depth int) {
	if _, ok := d.pos[path]; !ok {
		if p := position(n); p.Line > 0 {
			d.pos[path] = p
		}
	}
	if depth > maxDepth {
		d.fail(n, path, "nested too deeply")
		return
	}
	if !d.plain(n, path) {
		return
	}
	t := v.Type()
	if f, ok := d.opts.Scalars[t]; ok {
		x, err := f(scalar(n), tag)
		switch {
		case err != nil:
			d.fail(n, path, "%v", err)
		case x == nil:
			v.SetZero()
		default:
			v.Set(reflect.ValueOf(x))
		}
		return
	}
	switch {
	case t == settingsType:
		d.decodeSettings(path, n, v)
		return
	case t == durationType:
		s, ok := d.text(path, n, "a duration such as 10m or 90s")
		if !ok {
			return
		}
		dur, err := time.ParseDuration(s)
		if err != nil {
			d.fail(n, path, "expected a duration such as 10m or 90s, got %q", s)
			return
		}
		v.SetInt(int64(dur))
		return
	case reflect.PointerTo(t).Implements(textType) && t.Kind() != reflect.Struct:
		s, ok := d.text(path, n, "a string")
		if !ok {
			return
		}
		if err := v.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(s)); err != nil {
			d.fail(n, path, "%v", err)
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		d.decodeStruct(path, n, v, depth)
	case reflect.Pointer:
		if _, null := n.(*ast.NullNode); null {
			v.SetZero()
			return
		}
		elem := reflect.New(t.Elem())
		d.decode(path, n, elem.Elem(), tag, depth)
		v.Set(elem)
	case reflect.Slice:
		seq, ok := n.(*ast.SequenceNode)
		if !ok {
			d.fail(n, path, "expected a list, got %s", kindOf(n))
			return
		}
		out := reflect.MakeSlice(t, len(seq.Values), len(seq.Values))
		for i, item := range seq.Values {
			d.decode(fmt.Sprintf("%s[%d]", path, i), item, out.Index(i), tag, depth+1)
		}
		v.Set(out)
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			d.fail(n, path, "cannot decode into %v", t)
			return
		}
		values, ok := mappingValues(n)
		if !ok {
			d.fail(n, path, "expected a mapping, got %s", kindOf(n))
			return
		}
		out := reflect.MakeMap(t)
		seen := map[string]bool{}
		for _, mv := range values {
			key, ok := d.key(path, mv, seen, "a string key", "duplicate key")
			if !ok {
				continue
			}
			elem := reflect.New(t.Elem()).Elem()
			d.decode(join(path, key), mv.Value, elem, tag, depth+1)
			out.SetMapIndex(reflect.ValueOf(key).Convert(t.Key()), elem)
		}
		v.Set(out)
	case reflect.String:
		if s, ok := d.text(path, n, "a string"); ok {
			v.SetString(s)
		}
	case reflect.Bool:
		b, ok := n.(*ast.BoolNode)
		if !ok {
			d.fail(n, path, "expected true or false, got %s", kindOf(n))
			return
		}
		v.SetBool(b.Value)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		d.decodeUint(path, n, v)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		d.decodeInt(path, n, v)
	default:
		d.fail(n, path, "cannot decode into %v", t)
	}
}

// text returns the value of a string scalar.
func (d *decoder) text(path string, n ast.Node, want string) (string, bool) {
	switch n := n.(type) {
	case *ast.StringNode:
		return n.Value, true
	case *ast.LiteralNode:
		return n.Value.Value, true
	}
	d.fail(n, path, "expected %s, got %s", want, kindOf(n))
	return "", false
}

func (d *decoder) decodeUint(path string, n ast.Node, v reflect.Value) {
	maxV := uint64(math.MaxUint64) >> (64 - v.Type().Bits())
	want := fmt.Sprintf("an integer from 0 to %d", maxV)
	in, ok := n.(*ast.IntegerNode)
	if !ok {
		d.fail(n, path, "expected %s, got %s", want, kindOf(n))
		return
	}
	var u uint64
	switch x := in.Value.(type) {
	case int64:
		if x < 0 {
			d.fail(n, path, "expected %s, got %d", want, x)
			return
		}
		u = uint64(x)
	case uint64:
		u = x
	default:
		d.fail(n, path, "expected %s, got %s", want, in.Token.Value)
		return
	}
	if v.OverflowUint(u) {
		d.fail(n, path, "expected %s, got %d", want, u)
		return
	}
	v.SetUint(u)
}

func (d *decoder) decodeInt(path string, n ast.Node, v reflect.Value) {
	bits := v.Type().Bits()
	minV, maxV := int64(-1)<<(bits-1), int64(math.MaxInt64)>>(64-bits)
	want := fmt.Sprintf("an integer from %d to %d", minV, maxV)
	in, ok := n.(*ast.IntegerNode)
	if !ok {
		d.fail(n, path, "expected %s, got %s", want, kindOf(n))
		return
	}
	x, ok := in.Value.(int64)
	if !ok || v.OverflowInt(x) {
		d.fail(n, path, "expected %s, got %s", want, in.Token.Value)
		return
	}
	v.SetInt(x)
}

// key returns a mapping entry's key, reporting merge keys, keys that are not strings and
// repeated keys.
func (d *decoder) key(path string, mv *ast.MappingValueNode, seen map[string]bool, want, duplicate string) (string, bool) {
	if _, ok := mv.Key.(*ast.MergeKeyNode); ok {
		d.fail(mv.Key, path, "merge keys (<<) are not allowed")
		return "", false
	}
	k, ok := mv.Key.(*ast.StringNode)
	if !ok {
		d.fail(mv.Key, path, "expected %s, got %s", want, kindOf(mv.Key))
		return "", false
	}
	if seen[k.Value] {
		d.fail(mv.Key, join(path, k.Value), "%s", duplicate)
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
	index []int
	tag   reflect.StructTag
}

// fieldsOf maps a struct's YAML field names to its fields, flattening ",inline" fields, and
// lists the names in field order.
func fieldsOf(t reflect.Type) (map[string]structField, []string) {
	fields := map[string]structField{}
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if opts == "inline" && f.Type.Kind() == reflect.Struct {
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
		fields[name] = structField{index: []int{i}, tag: f.Tag}
		names = append(names, name)
	}
	return fields, names
}

func (d *decoder) decodeStruct(path string, n ast.Node, v reflect.Value, depth int) {
	if _, null := n.(*ast.NullNode); null {
		return // an empty section keeps its values
	}
	values, ok := mappingValues(n)
	if !ok {
		d.fail(n, path, "expected a mapping, got %s", kindOf(n))
		return
	}
	fields, names := fieldsOf(v.Type())
	seen := map[string]bool{}
	for _, mv := range values {
		key, ok := d.key(path, mv, seen, "a field name", "duplicate field")
		if !ok {
			continue
		}
		f, ok := fields[key]
		if !ok {
			d.fail(mv.Key, join(path, key), "unknown field, expected one of %s", strings.Join(names, ", "))
			continue
		}
		d.decode(join(path, key), mv.Value, v.FieldByIndex(f.index), f.tag, depth+1)
	}
}

func (d *decoder) decodeSettings(path string, n ast.Node, v reflect.Value) {
	values, ok := mappingValues(n)
	if !ok {
		d.fail(n, path, "expected a mapping, got %s", kindOf(n))
		return
	}
	var out Settings
	seen := map[string]bool{}
	for _, mv := range values {
		key, ok := d.key(path, mv, seen, "a string key", "duplicate key")
		if !ok {
			continue
		}
		s := Setting{Key: key, Position: position(mv.Key)}
		valid := true
		if seq, ok := mv.Value.(*ast.SequenceNode); ok {
			s.List = true
			for _, item := range seq.Values {
				x, ok := d.settingValue(join(path, key), s.Position, item)
				valid = valid && ok
				s.Values = append(s.Values, x)
			}
		} else {
			x, ok := d.settingValue(join(path, key), s.Position, mv.Value)
			valid = ok
			s.Values = []Scalar{x}
		}
		if valid {
			out = append(out, s)
		}
	}
	v.Set(reflect.ValueOf(out))
}

// settingValue returns one value of a setting whose key is at keyPos.
func (d *decoder) settingValue(path string, keyPos Position, n ast.Node) (Scalar, bool) {
	if !d.plain(n, path) {
		return Scalar{}, false
	}
	s := scalar(n)
	switch s.Kind {
	case KindString, KindInteger, KindFloat, KindBool:
		return s, true
	case KindNull:
		// An implicit null has no place of its own: point at its key.
		d.failAt(keyPos, path, `no value (write "" for an empty one)`)
	default:
		d.fail(n, path, "expected a value, got %s", s.Kind)
	}
	return Scalar{}, false
}
