package strictyaml_test

import (
	"errors"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/strictyaml"
)

type level uint8

type inner struct {
	A string `yaml:"a"`
}

type doc struct {
	Name    string            `yaml:"name"`
	Count   uint8             `yaml:"count"`
	Delta   int16             `yaml:"delta"`
	On      bool              `yaml:"on"`
	Wait    time.Duration     `yaml:"wait"`
	Items   []string          `yaml:"items"`
	Labels  map[string]string `yaml:"labels"`
	Inner   inner             `yaml:"inner"`
	Ptr     *uint32           `yaml:"ptr"`
	Code    upper             `yaml:"code"`
	Tagged  []level           `yaml:"tagged" max:"3"`
	Flat    `yaml:",inline"`
	Ignored string
	//lint:ignore U1000 an unexported field, which decoding must leave alone
	internal string
}

type Flat struct {
	Extra string `yaml:"extra"`
}

// upper is a TextUnmarshaler that accepts upper-case text only.
type upper string

func (u *upper) UnmarshalText(b []byte) error {
	if s := string(b); s != strings.ToUpper(s) {
		return errors.New("expected upper case")
	}
	*u = upper(b)
	return nil
}

// levelOptions decode a level from an integer no larger than its field's max tag.
var levelOptions = strictyaml.Options{Scalars: map[reflect.Type]strictyaml.ScalarFunc{
	reflect.TypeFor[level](): func(s strictyaml.Scalar, tag reflect.StructTag) (any, error) {
		if s.Kind != strictyaml.KindInteger || s.Text > tag.Get("max") || len(s.Text) != 1 {
			return nil, errors.New("expected a level up to " + tag.Get("max") + ", got " + s.Kind.String() + " " + s.Text)
		}
		return level(s.Text[0] - '0'), nil
	},
}}

func decode(t *testing.T, src string, v any) (strictyaml.Positions, []string) {
	t.Helper()
	d, err := strictyaml.Parse("f.yaml", []byte(src))
	var pos strictyaml.Positions
	if err == nil {
		pos, err = d.Decode(v, levelOptions)
	}
	var msgs []string
	for _, e := range strictyaml.Errors(err) {
		msgs = append(msgs, e.Error())
	}
	if err != nil && len(msgs) == 0 {
		t.Fatalf("error without position: %v", err)
	}
	return pos, msgs
}

func TestDecode(t *testing.T) {
	src := `name: "n"
count: 255
delta: -3
on: true
wait: 90s
items: [a, b]
labels: {x: "1"}
inner:
  a: deep
ptr: 7
code: ABC
tagged: [1, 3]
extra: e
`
	got := doc{Name: "default", Ignored: "kept"}
	pos, errs := decode(t, src, &got)
	if errs != nil {
		t.Fatal(errs)
	}
	seven := uint32(7)
	want := doc{Name: "n", Count: 255, Delta: -3, On: true, Wait: 90 * time.Second, Items: []string{"a", "b"},
		Labels: map[string]string{"x": "1"}, Inner: inner{A: "deep"}, Ptr: &seven, Code: "ABC",
		Tagged: []level{1, 3}, Flat: Flat{Extra: "e"}, Ignored: "kept"}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(doc{})); diff != "" {
		t.Errorf("decoded (-want +got):\n%s", diff)
	}
	for path, want := range map[string]strictyaml.Position{"": {1, 1}, "inner.a": {9, 6}, "items[1]": {6, 12}, "labels.x": {7, 13}} {
		if p, ok := pos.Of(path); !ok || p != want {
			t.Errorf("position of %q = %v, %v; want %v, true", path, p, ok, want)
		}
	}
	if p, ok := pos.Of("inner.b[3]"); ok || p != (strictyaml.Position{Line: 9, Column: 3}) {
		t.Errorf("position of an undecoded path = %v, %v; want that of inner, false", p, ok)
	}
}

func TestDecodeKeepsDefaults(t *testing.T) {
	got := doc{Name: "default", Inner: inner{A: "default"}}
	if _, errs := decode(t, "inner:\ncount: 1\n", &got); errs != nil {
		t.Fatal(errs)
	}
	if got.Name != "default" || got.Inner.A != "default" || got.Count != 1 {
		t.Errorf("got %+v: want name and inner.a kept, count set", got)
	}
}

func TestDecodeRefusals(t *testing.T) {
	tests := map[string]struct {
		src  string
		want []string
	}{
		"unknown field": {"name: a\nnmae: b\n",
			[]string{"f.yaml:2:1: nmae: unknown field, expected one of name, count, delta, on, wait, items, labels, inner, ptr, code, tagged, extra"}},
		"duplicate key": {"name: a\nname: b\n",
			[]string{`f.yaml:2:1: malformed YAML: mapping key "name" already defined at [1:1]`}},
		"two documents": {"name: a\n---\nname: b\n",
			[]string{"f.yaml:3:1: 2 YAML documents, expected exactly one"}},
		"syntax": {"name: \"a\n",
			[]string{"f.yaml:1:7: malformed YAML: could not find end character of double-quoted text"}},
		"wrong types": {"name: [a]\ncount: x\non: 1\nitems: a\nlabels: [a]\ninner: 3\nwait: 5\n", []string{
			"f.yaml:1:7: name: expected a string, got a list",
			"f.yaml:2:8: count: expected an integer from 0 to 255, got a string",
			"f.yaml:3:5: on: expected true or false, got an integer",
			"f.yaml:4:8: items: expected a list, got a string",
			"f.yaml:5:9: labels: expected a mapping, got a list",
			"f.yaml:6:8: inner: expected a mapping, got an integer",
			"f.yaml:7:7: wait: expected a duration such as 10m or 90s, got an integer",
		}},
		"out of range": {"count: 256\ndelta: 40000\nptr: -1\n", []string{
			"f.yaml:1:8: count: expected an integer from 0 to 255, got 256",
			"f.yaml:2:8: delta: expected an integer from -32768 to 32767, got 40000",
			"f.yaml:3:6: ptr: expected an integer from 0 to 4294967295, got -1",
		}},
		"bad values": {"wait: soon\ncode: abc\ntagged: [1, 4, x]\n", []string{
			`f.yaml:1:7: wait: expected a duration such as 10m or 90s, got "soon"`,
			"f.yaml:2:7: code: expected upper case",
			"f.yaml:3:13: tagged[1]: expected a level up to 3, got an integer 4",
			"f.yaml:3:16: tagged[2]: expected a level up to 3, got a string x",
		}},
		"anchors, aliases, tags and merge keys": {"name: &n a\nextra: *n\ncode: !!str A\ninner:\n  <<: {a: b}\n", []string{
			"f.yaml:1:7: name: expected plain YAML, got an anchor (anchors, aliases and tags are not allowed)",
			"f.yaml:2:8: extra: expected plain YAML, got an alias (anchors, aliases and tags are not allowed)",
			"f.yaml:3:7: code: expected plain YAML, got a tagged value (anchors, aliases and tags are not allowed)",
			"f.yaml:5:3: inner: merge keys (<<) are not allowed",
		}},
		"non-string keys": {"1: a\nlabels: {2: b}\n", []string{
			"f.yaml:1:1: expected a field name, got an integer",
			"f.yaml:2:10: labels: expected a string key, got an integer",
		}},
		"not a mapping": {"- a\n", []string{"f.yaml:1:1: expected a mapping, got a list"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var got doc
			_, errs := decode(t, tc.src, &got)
			if len(errs) == 0 {
				t.Fatal("decoded")
			}
			if diff := cmp.Diff(tc.want, errs); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}

// tree nests without end.
type tree map[string]tree

func TestDecodeTooDeep(t *testing.T) {
	var v tree
	_, errs := decode(t, strings.Repeat("{a: ", 20)+"b"+strings.Repeat("}", 20)+"\n", &v)
	if len(errs) != 1 || !strings.HasSuffix(errs[0], "nested too deeply") {
		t.Errorf("errors %q, want one saying nested too deeply", errs)
	}
}

func TestSettings(t *testing.T) {
	src := `# a comment
url: nats://a:4222
count: 0x10
on: yes
roots:
  - /a
  - "/b"
empty: ""
`
	var got strictyaml.Settings
	if _, errs := decode(t, src, &got); errs != nil {
		t.Fatal(errs)
	}
	s := func(k strictyaml.Kind, text string, line, col int) strictyaml.Scalar {
		return strictyaml.Scalar{Kind: k, Text: text, Position: strictyaml.Position{Line: line, Column: col}}
	}
	want := strictyaml.Settings{
		{Key: "url", Position: strictyaml.Position{Line: 2, Column: 1}, Values: []strictyaml.Scalar{s(strictyaml.KindString, "nats://a:4222", 2, 6)}},
		{Key: "count", Position: strictyaml.Position{Line: 3, Column: 1}, Values: []strictyaml.Scalar{s(strictyaml.KindInteger, "0x10", 3, 8)}},
		{Key: "on", Position: strictyaml.Position{Line: 4, Column: 1}, Values: []strictyaml.Scalar{s(strictyaml.KindString, "yes", 4, 5)}},
		{Key: "roots", Position: strictyaml.Position{Line: 5, Column: 1}, List: true, Values: []strictyaml.Scalar{s(strictyaml.KindString, "/a", 6, 5), s(strictyaml.KindString, "/b", 7, 5)}},
		{Key: "empty", Position: strictyaml.Position{Line: 8, Column: 1}, Values: []strictyaml.Scalar{s(strictyaml.KindString, "", 8, 8)}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("settings (-want +got):\n%s", diff)
	}
}

func TestSettingsRefusals(t *testing.T) {
	tests := map[string]struct {
		src  string
		want []string
	}{
		"null":          {"a:\n", []string{`f.yaml:1:1: a: no value (write "" for an empty one)`}},
		"null in list":  {"a:\n  - x\n  -\n", []string{`f.yaml:1:1: a: no value (write "" for an empty one)`}},
		"mapping value": {"a:\n  b: c\n", []string{"f.yaml:2:3: a: expected a value, got a mapping"}},
		"nested list":   {"a: [[b]]\n", []string{"f.yaml:1:5: a: expected a value, got a list"}},
		"alias":         {"a: &x b\nc: *x\n", []string{"f.yaml:1:4: a: expected plain YAML, got an anchor (anchors, aliases and tags are not allowed)", "f.yaml:2:4: c: expected plain YAML, got an alias (anchors, aliases and tags are not allowed)"}},
		"not a mapping": {"[a]\n", []string{"f.yaml:1:1: expected a mapping, got a list"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var got strictyaml.Settings
			_, errs := decode(t, tc.src, &got)
			if diff := cmp.Diff(tc.want, errs); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}

func TestEmptyDocument(t *testing.T) {
	for _, src := range []string{"", "# only a comment\n", "~\n"} {
		d, err := strictyaml.Parse("f.yaml", []byte(src))
		if err != nil {
			t.Fatalf("%q: %v", src, err)
		}
		if !d.Empty() || d.Kind() != strictyaml.KindNull {
			t.Errorf("%q: Empty() = %v, Kind() = %v; want true, null", src, d.Empty(), d.Kind())
		}
		got := doc{Name: "default"}
		if _, err := d.Decode(&got, strictyaml.Options{}); err != nil || got.Name != "default" {
			t.Errorf("%q: decoding an empty document: %v, name %q", src, err, got.Name)
		}
	}
}

func TestDecodeWantsPointer(t *testing.T) {
	d, err := strictyaml.Parse("f.yaml", []byte("a: b\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Decode(doc{}, strictyaml.Options{}); err == nil {
		t.Error("decoding into a non-pointer succeeded")
	}
}

// TestDependencies keeps the package a leaf: policy, which must import no NATS, Vault or
// libvirt, depends on it.
func TestDependencies(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("finding the go command: %v", err)
	}
	out, err := exec.CommandContext(t.Context(), goTool, "list", "-deps", "github.com/lethe-cc/lethe/internal/strictyaml").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		first, _, _ := strings.Cut(dep, "/")
		if strings.Contains(first, ".") && !strings.HasPrefix(dep, "github.com/goccy/go-yaml") &&
			dep != "github.com/lethe-cc/lethe/internal/strictyaml" && dep != "github.com/lethe-cc/lethe/internal/errtree" {
			t.Errorf("strictyaml depends on %s: it may import only goccy/go-yaml, internal/errtree and the standard library", dep)
		}
	}
}

// FuzzDecode feeds the decoder arbitrary bytes, into a struct and into Settings: it must
// decode or return positioned errors, never panic.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		"name: a\ncount: 3\nitems: [a, b]\nlabels: {x: y}\ninner: {a: b}\ntagged: [1]\n",
		"url: nats://a:4222\nroots:\n  - /a\n  - /b\n",
		"a: &a [*a, *a]\n", "{{{{", "- a\n---\n- b\n", "<<: {a: b}\n", "a: !!binary aGk=\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := strictyaml.Parse("fuzz.yaml", b)
		if err != nil {
			if len(strictyaml.Errors(err)) == 0 {
				t.Fatalf("error without position: %v", err)
			}
			return
		}
		var v doc
		if _, err := d.Decode(&v, levelOptions); err != nil && len(strictyaml.Errors(err)) == 0 {
			t.Fatalf("error without position: %v", err)
		}
		var s strictyaml.Settings
		if _, err := d.Decode(&s, strictyaml.Options{}); err != nil && len(strictyaml.Errors(err)) == 0 {
			t.Fatalf("error without position: %v", err)
		}
	})
}
