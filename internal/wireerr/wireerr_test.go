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
