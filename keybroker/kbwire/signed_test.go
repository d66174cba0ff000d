package kbwire

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/internal/dsse"
)

// TestTenantStatement: a tenant statement reads back as signed, verifies under the tenant's key
// only, and is not an admin statement.
func TestTenantStatement(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	want := ForgetGuestRequest{Tenant: "acme", VM: "web", Reason: "VM deleted"}
	signed, err := SignTenant(OpGuestForget, want, now, time.Minute, key)
	if err != nil {
		t.Fatal(err)
	}
	if typ, err := StatementType(signed); err != nil || typ != TenantPayloadType {
		t.Errorf("StatementType = %q, %v; want %q", typ, err, TenantPayloadType)
	}
	env, st, err := ParseTenant(signed)
	if err != nil {
		t.Fatal(err)
	}
	var got ForgetGuestRequest
	if err := st.DecodeRequest(&got); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" || st.Op != OpGuestForget || !st.IssuedAt.Equal(now) || !st.Expires.Equal(now.Add(time.Minute)) || st.ID == "" {
		t.Errorf("statement %+v, request (-want +got):\n%s", st, diff)
	}
	if _, err := env.Verify(TenantPayloadType, pub); err != nil {
		t.Errorf("verifying under the tenant's key: %v", err)
	}
	if _, err := env.Verify(TenantPayloadType, other); !errors.Is(err, dsse.ErrSignature) {
		t.Errorf("verifying under another key: %v, want dsse.ErrSignature", err)
	}
	if _, err := OpenAdmin(signed, pub); err == nil {
		t.Error("a tenant statement opened as an admin statement")
	}
	admin, err := SignAdmin(OpGuestForget, want, now, time.Minute, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ParseTenant(admin); !errors.Is(err, ErrStatement) {
		t.Errorf("an admin statement parsed as a tenant statement: %v", err)
	}
	if _, err := SignTenant(OpGuestForget, want, now, MaxAdminValidity+time.Second, key); err == nil {
		t.Error("signed a tenant statement valid longer than MaxAdminValidity")
	}
}

// FuzzParseTenant: a tenant statement is untrusted bytes (the broker carries it); parsing
// never panics, and what parses has an op, an ID, times and a request.
func FuzzParseTenant(f *testing.F) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	signed, err := SignTenant(OpGuestForget, ForgetGuestRequest{Tenant: "acme", VM: "web"}, time.Now(), time.Minute, key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(signed)
	f.Add([]byte(`{"payloadType":"application/vnd.lethe.tenant-request+json","payload":"e30=","signatures":[]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = StatementType(b)
		_, st, err := ParseTenant(b)
		if err != nil {
			return
		}
		if st.Op == "" || st.ID == "" || st.IssuedAt.IsZero() || st.Expires.IsZero() || len(st.Request) == 0 {
			t.Errorf("parsed a statement without op, id, times or request: %+v", st)
		}
	})
}
