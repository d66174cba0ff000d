package policy

import (
	"encoding/hex"
	"fmt"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/strictyaml"
)

// MaxSize is the largest policy file Parse accepts.
const MaxSize = 256 << 10

// ParseError is one problem in a policy file, at a position: its Path is the field, such as
// spec.source.snp.vmpl (empty for the document itself), and its Message says what was
// expected. Error formats it as file:line:col: path: message.
type ParseError = strictyaml.Error

// ParseErrors returns the ParseErrors in err's tree, in order.
func ParseErrors(err error) []*ParseError { return strictyaml.Errors(err) }

// Parse reads a policy from b; file names it in errors. Every problem found is returned as a
// *ParseError joined with errors.Join (see ParseErrors); the policy is returned only when
// there is none. The CEL expression, if any, is compiled and type-checked here.
func Parse(file string, b []byte) (*Policy, error) {
	if len(b) > MaxSize {
		return nil, &ParseError{File: file, Message: fmt.Sprintf("%d bytes, expected at most %d", len(b), MaxSize)}
	}
	spec, err := decodeDefaults()
	if err != nil {
		return nil, fmt.Errorf("decoding defaults: %w", err)
	}
	p := &Policy{Spec: spec}
	doc, err := strictyaml.Parse(file, b)
	if err != nil {
		return nil, err
	}
	if doc.Empty() {
		return nil, &ParseError{File: file, Line: 1, Column: 1, Message: "empty document, expected a MigrationPolicy"}
	}
	pos, err := doc.Decode(p, decodeOptions)
	c := &checker{file: file, pos: pos, errs: ParseErrors(err)}
	c.validate(p)
	if p.Spec.CEL != "" && len(p.Spec.CEL) <= maxCELSize {
		prg, err := compileCEL(p.Spec.CEL)
		if err != nil {
			c.fail("spec.cel", "%v", err)
		}
		p.cel = prg
	}
	if len(c.errs) > 0 {
		return nil, strictyaml.Join(c.errs)
	}
	p.raw = slices.Clone(b)
	return p, nil
}

// decodeOptions decodes the policy types package strictyaml does not know.
var decodeOptions = strictyaml.Options{
	Scalars: map[reflect.Type]strictyaml.ScalarFunc{reflect.TypeFor[attest.HexBytes](): decodeHex},
}

// defaultsDoc is DefaultsYAML parsed once; decoding it (which never changes it) gives every
// policy its own copy of the defaults.
var defaultsDoc = sync.OnceValues(func() (*strictyaml.Document, error) {
	return strictyaml.Parse("defaults.yaml", DefaultsYAML)
})

func decodeDefaults() (Spec, error) {
	doc, err := defaultsDoc()
	if err != nil {
		return Spec{}, err
	}
	var d struct {
		Spec Spec `yaml:"spec"`
	}
	if _, err := doc.Decode(&d, decodeOptions); err != nil {
		return Spec{}, err
	}
	return d.Spec, nil
}

// decodeHex decodes a hex string of as many bytes as the field's hex tag says (any number
// without one). It reads the scalar's text as written, so that a hex string of digits only is
// not taken for a number.
func decodeHex(s strictyaml.Scalar, tag reflect.StructTag) (any, error) {
	hexLen, _ := strconv.Atoi(tag.Get("hex"))
	want := "a hex string"
	if hexLen > 0 {
		want = fmt.Sprintf("%d bytes as %d hex digits", hexLen, 2*hexLen)
	}
	switch s.Kind {
	case strictyaml.KindString, strictyaml.KindInteger, strictyaml.KindFloat:
	case strictyaml.KindNull:
		return nil, nil
	default:
		return nil, fmt.Errorf("expected %s, got %s", want, s.Kind)
	}
	text := strings.TrimPrefix(strings.TrimPrefix(s.Text, "0x"), "0X")
	b, err := hex.DecodeString(text)
	if err != nil {
		return nil, fmt.Errorf("expected %s, got %q (not hex)", want, text)
	}
	if hexLen > 0 && len(b) != hexLen {
		return nil, fmt.Errorf("expected %s, got %s", want, plural(len(b), "byte"))
	}
	return attest.HexBytes(b), nil
}

func plural(n int, unit string) string {
	if n == 1 {
		return "1 " + unit
	}
	return fmt.Sprintf("%d %ss", n, unit)
}

// checker collects the problems of a decoded policy that its types alone do not rule out,
// after those of decoding.
type checker struct {
	file string
	pos  strictyaml.Positions
	errs []*ParseError
}

// fail reports an error at path's position, or at its closest decoded parent's.
func (c *checker) fail(path, format string, args ...any) {
	for _, e := range c.errs {
		if e.Path == path {
			return // one error a field: the decoder has said what was expected
		}
	}
	p, _ := c.pos.Of(path)
	c.errs = append(c.errs, &ParseError{File: c.file, Line: p.Line, Column: p.Column, Path: path, Message: fmt.Sprintf(format, args...)})
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

// name is the alphabet of tenant and policy names: they become parts of Vault key names.
var name = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// guestPattern is a guest selector: a VM name (the keybroker's alphabet of VM names), such a
// name's prefix followed by '*', or '*' alone.
var guestPattern = regexp.MustCompile(`^(\*|[a-z0-9][a-z0-9._-]{0,62}|[a-z0-9][a-z0-9._-]{0,61}\*)$`)

const guestWant = "a VM name (lowercase letters, digits, '.', '_' and '-'), a prefix of one followed by '*', or '*'"

const nameWant = "1 to 63 lowercase letters, digits and dashes, starting and ending with a letter or digit"

// validate checks what the types alone do not.
func (c *checker) validate(p *Policy) {
	if p.APIVersion != APIVersion {
		c.fail("apiVersion", "expected %q, got %q", APIVersion, p.APIVersion)
	}
	if p.Kind != Kind {
		c.fail("kind", "expected %q, got %q", Kind, p.Kind)
	}
	if !name.MatchString(p.Metadata.Tenant) {
		c.fail("metadata.tenant", "expected %s, got %q", nameWant, p.Metadata.Tenant)
	}
	if !name.MatchString(p.Metadata.Name) {
		c.fail("metadata.name", "expected %s, got %q", nameWant, p.Metadata.Name)
	}
	if _, ok := c.pos["metadata.policySvn"]; !ok {
		c.fail("metadata.policySvn", "expected an integer from 0 to %d, got nothing", uint64(math.MaxUint64))
	}
	for i, g := range p.Spec.Guests {
		path := fmt.Sprintf("spec.guests[%d]", i)
		switch {
		case !guestPattern.MatchString(g):
			c.fail(path, "expected %s, got %q", guestWant, g)
		case slices.Index(p.Spec.Guests, g) != i:
			c.fail(path, "duplicate guest pattern %q", g)
		}
	}
	c.validateEnd("spec.source", p.Spec.Source)
	dst := p.Spec.Destination
	c.validateEnd("spec.destination", dst.EndRequirements)
	for k, val := range dst.HostLabels {
		if k == "" {
			c.fail("spec.destination.hostLabels", "expected non-empty label names")
		}
		if strings.ContainsAny(k, "=,") || strings.ContainsAny(val, ",") {
			c.fail(join("spec.destination.hostLabels", k), "expected a label without '=' or ',' in its name and ',' in its value")
		}
	}
	for i, r := range dst.Regions {
		if r == "" {
			c.fail(fmt.Sprintf("spec.destination.regions[%d]", i), "expected a region name, got an empty string")
		}
	}
	if len(p.Spec.Transport.CipherSuites) == 0 {
		c.fail("spec.transport.cipherSuites", "expected at least one of %s", strings.Join(CipherSuites, ", "))
	}
	for i, s := range p.Spec.Transport.CipherSuites {
		if !slices.Contains(CipherSuites, s) {
			c.fail(fmt.Sprintf("spec.transport.cipherSuites[%d]", i), "expected one of %s, got %q", strings.Join(CipherSuites, ", "), s)
		}
	}
	if md := p.Spec.Transport.MaxDowntime; md != 0 && (md < time.Millisecond || md > MaxDowntimeLimit) {
		c.fail("spec.transport.maxDowntime", "expected 0 or a duration from 1ms to %v, got %v", MaxDowntimeLimit, md)
	}
	if dl := p.Spec.Erasure.Deadline; dl < time.Second || dl > 24*time.Hour {
		c.fail("spec.erasure.deadline", "expected a duration from 1s to 24h, got %v", dl)
	}
	if len(p.Spec.CEL) > maxCELSize {
		c.fail("spec.cel", "expected at most %d bytes, got %d", maxCELSize, len(p.Spec.CEL))
	}
}

func (c *checker) validateEnd(path string, e EndRequirements) {
	if len(e.Platforms) == 0 {
		c.fail(join(path, "platforms"), "expected at least one platform (sev-snp, tdx, emulated-sev-snp, emulated-tdx)")
	}
	for i, pl := range e.Platforms {
		if slices.Index(e.Platforms, pl) != i {
			c.fail(fmt.Sprintf("%s.platforms[%d]", path, i), "duplicate platform %v", pl)
		}
	}
	for i, pr := range e.SNP.Products {
		if !slices.Contains(SNPProducts, pr) {
			c.fail(fmt.Sprintf("%s.snp.products[%d]", path, i), "expected one of %s, got %q", strings.Join(SNPProducts, ", "), pr)
		}
	}
	if e.SNP.VMPL != nil && *e.SNP.VMPL > 3 {
		c.fail(join(path, "snp.vmpl"), "expected an integer from 0 to 3, got %d", *e.SNP.VMPL)
	}
}
