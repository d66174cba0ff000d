package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"cel.dev/cel-go/cel"

	"github.com/lethe-cc/lethe/attest"
)

// maxCELSize bounds a policy's CEL expression, in bytes.
const maxCELSize = 4096

// CELCostLimit bounds the runtime cost of one evaluation of a policy's CEL expression (in
// cel-go's cost units, about one per operation); an expression that exceeds it is a denial.
const CELCostLimit = 100_000

// celProgram is a compiled, type-checked CEL expression. Safe for concurrent use.
type celProgram struct {
	prg cel.Program
}

var celEnv = sync.OnceValues(func() (*cel.Env, error) {
	claims := cel.MapType(cel.StringType, cel.DynType)
	return cel.NewEnv(
		cel.Variable("source", claims),
		cel.Variable("destination", claims),
		cel.Variable("host", cel.MapType(cel.StringType, cel.DynType)),
		cel.CrossTypeNumericComparisons(true),
		cel.ParserExpressionSizeLimit(maxCELSize),
		cel.ParserRecursionLimit(32),
	)
})

// compileCEL parses and type-checks expr. The result must be a bool (or dyn, checked when the
// expression runs: claims are maps whose values the checker cannot type).
func compileCEL(expr string) (*celProgram, error) {
	env, err := celEnv()
	if err != nil {
		return nil, fmt.Errorf("building CEL environment: %w", err)
	}
	checked, iss := env.Compile(expr)
	if iss != nil && iss.Err() != nil {
		var msgs []string
		for _, e := range iss.Errors() {
			msgs = append(msgs, fmt.Sprintf("CEL %d:%d: %s", e.Location.Line(), e.Location.Column()+1, e.Message))
		}
		return nil, errors.New(strings.Join(msgs, "; "))
	}
	if out := checked.OutputType(); !out.IsExactType(cel.BoolType) && !out.IsExactType(cel.DynType) {
		return nil, fmt.Errorf("expected a CEL expression of type bool, got %v", out)
	}
	prg, err := env.Program(checked, cel.CostLimit(CELCostLimit))
	if err != nil {
		return nil, fmt.Errorf("building CEL program: %w", err)
	}
	return &celProgram{prg: prg}, nil
}

// eval runs the expression. Any error, a non-bool result or false is reported by the caller as
// a denial.
func (c *celProgram) eval(vars map[string]any) (ok bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			ok, err = false, fmt.Errorf("CEL evaluation failed: %v", r)
		}
	}()
	out, _, err := c.prg.Eval(vars)
	if err != nil {
		return false, err
	}
	b, isBool := out.Value().(bool)
	if !isBool {
		return false, fmt.Errorf("result is %v of type %v, not a bool", out.Value(), out.Type())
	}
	return b, nil
}

// claimsVar turns claims into the map a CEL expression sees: the claims' JSON encoding with
// integers as int, byte strings as hex and the statement decoded as an object. Nil claims are
// an empty map.
func claimsVar(c *attest.Claims) (map[string]any, error) {
	if c == nil {
		return map[string]any{}, nil
	}
	b, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encoding claims: %w", err)
	}
	m, err := decodeJSONObject(b)
	if err != nil {
		return nil, fmt.Errorf("encoding claims: %w", err)
	}
	if len(c.Statement) > 0 {
		if stmt, err := decodeJSONObject(c.Statement); err == nil {
			m["statement"] = stmt
		} else {
			delete(m, "statement")
		}
	}
	return m, nil
}

func decodeJSONObject(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, errors.New("not a JSON object")
	}
	return convertNumbers(m).(map[string]any), nil
}

// convertNumbers replaces json.Numbers with int64 where they are integers, float64 otherwise.
func convertNumbers(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			v[k] = convertNumbers(x)
		}
		return v
	case []any:
		for i, x := range v {
			v[i] = convertNumbers(x)
		}
		return v
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i
		}
		f, _ := v.Float64()
		return f
	}
	return v
}

func hostVar(h HostInfo) map[string]any {
	labels := make(map[string]any, len(h.Labels))
	for k, v := range h.Labels {
		labels[k] = v
	}
	return map[string]any{"labels": labels, "region": h.Region}
}
