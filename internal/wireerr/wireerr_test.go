package wireerr_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/lethe-cc/lethe/internal/wireerr"
)

func TestIs(t *testing.T) {
	err := fmt.Errorf("calling: %w", wireerr.New("denied", "rule a"))
	tests := map[string]struct {
		target error
		want   bool
	}{
		"its code":          {wireerr.Code("denied"), true},
		"an error the code": {wireerr.New("denied", "other text"), true},
		"another code":      {wireerr.Code("not_found"), false},
		"a plain error":     {errors.New("denied"), false},
	}
	for name, tt := range tests {
		if got := errors.Is(err, tt.target); got != tt.want {
			t.Errorf("%s: errors.Is = %v, want %v", name, got, tt.want)
		}
	}
	if got, want := err.Error(), "calling: denied: rule a"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestTable(t *testing.T) {
	errMissing, errBusy := errors.New("missing"), errors.New("busy")
	table := wireerr.Table{{Err: errMissing, Code: "not_found"}, {Err: errBusy, Code: "busy"}}

	if got := table.Public(fmt.Errorf("looking up x: %w", errMissing)); got == nil || got.Code != "not_found" || got.Message != "looking up x: missing" {
		t.Errorf("Public(a sentinel) = %+v, want not_found with the error's text", got)
	}
	// Another API's error answer, wrapped by a handler, is not answered under its code.
	if got := table.Public(fmt.Errorf("calling the keybroker: %w", wireerr.New("not_found", "no such tenant"))); got != nil {
		t.Errorf("Public(another API's answer) = %+v, want internal (nil)", got)
	}
	if got := table.Public(errors.New("disk on fire")); got != nil {
		t.Errorf("Public(an internal error) = %+v, want nil", got)
	}

	answer := fmt.Errorf("calling: %w", wireerr.New("busy", "try later"))
	got := table.Sentinel(answer, "api: ")
	if !errors.Is(got, errBusy) || !errors.Is(got, wireerr.Code("busy")) || got.Error() != "api: busy: try later" {
		t.Errorf("Sentinel = %v (matches sentinel %v, code %v), want both and the prefix", got, errors.Is(got, errBusy), errors.Is(got, wireerr.Code("busy")))
	}
	other := wireerr.New("denied", "no")
	if got := table.Sentinel(other, ""); got != error(other) {
		t.Errorf("Sentinel(a code not in the table) = %v, want it unchanged", got)
	}
}
