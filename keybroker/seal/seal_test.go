package seal

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
)

func TestSealOpen(t *testing.T) {
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	tk, mdk := bytes.Repeat([]byte{1}, KeySize), bytes.Repeat([]byte{2}, KeySize)
	tests := map[string]*Keys{
		"transfer key only": {TK: tk},
		"mdk only":          {MDK: mdk, Epoch: 1},
		"both":              {TK: tk, MDK: mdk, Epoch: 7},
	}
	for name, in := range tests {
		t.Run(name, func(t *testing.T) {
			ct, err := Seal(k.PublicKey(), "m1", attest.RoleDestination, in)
			if err != nil {
				t.Fatal(err)
			}
			got, err := k.Open("m1", attest.RoleDestination, ct)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(in, got); diff != "" {
				t.Errorf("keys (-sealed +opened):\n%s", diff)
			}
			for _, ctx := range []struct {
				id   string
				role attest.Role
			}{{"m2", attest.RoleDestination}, {"m1", attest.RoleSource}} {
				if _, err := k.Open(ctx.id, ctx.role, ct); !errors.Is(err, ErrOpen) {
					t.Errorf("opened as %s/%s: %v", ctx.id, ctx.role, err)
				}
			}
			got.Zeroize()
			if got.TK != nil || got.MDK != nil {
				t.Errorf("Zeroize left keys")
			}
		})
	}
	k.Zeroize()
	ct, _ := Seal(mustKey(t).PublicKey(), "m1", attest.RoleSource, &Keys{TK: tk})
	if _, err := k.Open("m1", attest.RoleSource, ct); !errors.Is(err, ErrOpen) {
		t.Errorf("a zeroized key opened: %v", err)
	}
}

func mustKey(t *testing.T) *PrivateKey {
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSealRefuses(t *testing.T) {
	k := mustKey(t)
	for name, in := range map[string]*Keys{
		"nothing":     {},
		"short TK":    {TK: make([]byte, 16)},
		"long MDK":    {MDK: make([]byte, 33)},
		"nil key set": nil,
	} {
		if _, err := Seal(k.PublicKey(), "m", attest.RoleSource, in); err == nil {
			t.Errorf("%s: sealed", name)
		}
	}
	if _, err := Seal([]byte("not a key"), "m", attest.RoleSource, &Keys{TK: make([]byte, KeySize)}); err == nil {
		t.Errorf("sealed to a malformed public key")
	}
}

func FuzzDecode(f *testing.F) {
	b, _ := encode(&Keys{TK: make([]byte, KeySize), MDK: make([]byte, KeySize), Epoch: 3})
	f.Add(b)
	f.Add([]byte("LK1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := decode(b)
		if err != nil {
			return
		}
		again, err := encode(k)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("decode/encode does not round trip: %v", err)
		}
	})
}
