package keybroker

import (
	"errors"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
)

// TestCreateKeyChecksWhatVaultHolds prepares keys under names the keybroker is about to
// create, straight in Vault, as someone with write access to the Transit mount could, and
// requires createKey to refuse every one that is not a fresh, non-exportable key of the
// wanted type, without deleting it.
func TestCreateKeyChecksWhatVaultHolds(t *testing.T) {
	srv := vaulttest.Start(t)
	vc := &vaultClient{c: srv.Client, transit: vaulttest.TransitMount, kv: vaulttest.KVMount}
	prepare := func(name string, params map[string]any, rotate bool) {
		t.Helper()
		if _, err := srv.Client.Logical().WriteWithContext(t.Context(), "transit/keys/"+name, params); err != nil {
			t.Fatal(err)
		}
		if rotate {
			if _, err := srv.Client.Logical().WriteWithContext(t.Context(), "transit/keys/"+name+"/rotate", nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	aes := "aes256-gcm96"
	tests := map[string]struct {
		name    string
		typ     string
		prepare map[string]any // nil: nothing prepared
		rotate  bool
		now     func() time.Time
		why     string // "": no error
	}{
		"new key":                  {name: "lethe-mig-new", typ: aes},
		"new ed25519 key":          {name: "lethe-new-signing", typ: "ed25519"},
		"exportable, prepared":     {name: "lethe-mig-exp", typ: aes, prepare: map[string]any{"type": aes, "exportable": true}, why: "exportable"},
		"plaintext backup allowed": {name: "lethe-mig-backup", typ: aes, prepare: map[string]any{"type": aes, "exportable": true, "allow_plaintext_backup": true}, why: "plaintext backup"},
		"another type":             {name: "lethe-mig-type", typ: aes, prepare: map[string]any{"type": "chacha20-poly1305"}, why: "type chacha20-poly1305"},
		"rotated":                  {name: "lethe-mig-rot", typ: aes, prepare: map[string]any{"type": aes}, rotate: true, why: "latest version 2"},
		"safe but old": {name: "lethe-mig-old", typ: aes, prepare: map[string]any{"type": aes},
			now: func() time.Time { return time.Now().Add(time.Hour) }, why: "existed before (created"},
		"shared key, existing and safe": {name: NonceWrappingKey, typ: aes, prepare: map[string]any{"type": aes},
			now: func() time.Time { return time.Now().Add(time.Hour) }},
		"shared key, exportable": {name: ReceiptSigningKey, typ: "ed25519", prepare: map[string]any{"type": "ed25519", "exportable": true}, why: "exportable"},
	}
	for label, tc := range tests {
		t.Run(label, func(t *testing.T) {
			if tc.prepare != nil {
				prepare(tc.name, tc.prepare, tc.rotate)
			}
			c := *vc
			c.now = tc.now
			err := c.createKey(t.Context(), tc.name, tc.typ)
			if tc.why == "" {
				if err != nil {
					t.Fatalf("createKey: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrUnsafeKey) || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("createKey = %v, want ErrUnsafeKey saying %q", err, tc.why)
			}
			// Refused, not removed: the key is not the keybroker's to delete here.
			if k, err := vc.readKey(t.Context(), tc.name); err != nil || k == nil {
				t.Errorf("the refused key is gone (%v)", err)
			}
		})
	}
}

// TestDeleteKeyReadsBack deletes through a Vault that answers a deletion without doing it,
// and requires deleteKey to say so; through the real one, the key is gone.
func TestDeleteKeyReadsBack(t *testing.T) {
	srv := vaulttest.Start(t)
	target, err := url.Parse(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	liar := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodDelete && strings.Contains(r.URL.Path, "/transit/keys/") {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(liar.Close)
	lc, err := vaulttest.NewClient(liar.URL, srv.Token)
	if err != nil {
		t.Fatal(err)
	}
	honest := &vaultClient{c: srv.Client, transit: vaulttest.TransitMount, kv: vaulttest.KVMount}
	lying := &vaultClient{c: lc, transit: vaulttest.TransitMount, kv: vaulttest.KVMount}
	for _, name := range []string{"k-lied", "k-deleted"} {
		if err := honest.createKey(t.Context(), name, "aes256-gcm96"); err != nil {
			t.Fatal(err)
		}
	}
	if err := lying.deleteKey(t.Context(), "k-lied"); !errors.Is(err, errKeyNotDeleted) {
		t.Errorf("deleteKey through a Vault that kept the key = %v, want errKeyNotDeleted", err)
	}
	if err := honest.deleteKey(t.Context(), "k-deleted"); err != nil {
		t.Errorf("deleteKey: %v", err)
	}
	if k, err := honest.readKey(t.Context(), "k-deleted"); err != nil || k != nil {
		t.Errorf("after deleteKey: key %+v, %v; want none", k, err)
	}
}

// TestReleaseRefusesPreparedKeys prepares, straight in Vault, an exportable key under the name
// of a migration's key (lethe-mig-<id>) or of the guest's next epoch key, and requires the
// release to be refused and audited, the guest to keep its live epoch key and record, nothing
// to be sealed under the prepared key, and the guest free for the next migration.
func TestReleaseRefusesPreparedKeys(t *testing.T) {
	for label, prepared := range map[string]func(id string) string{
		"migration key":  migrationKeyName,
		"next epoch key": func(string) string { return epochKeyName("demo", "vm1", 2) },
	} {
		t.Run(label, func(t *testing.T) {
			e := newEnv(t)
			e.adopt("vm1")
			live := epochKeyName("demo", "vm1", 1)
			name := prepared("m1")
			if _, err := e.admin.Logical().WriteWithContext(t.Context(), "transit/keys/"+name, map[string]any{"type": "aes256-gcm96", "exportable": true}); err != nil {
				t.Fatal(err)
			}
			m := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
			resp, err := e.kb.Release(t.Context(), m.req)
			if !errors.Is(err, ErrUnsafeKey) || resp != nil {
				t.Fatalf("Release with %s prepared = %v, want ErrUnsafeKey and nothing released", name, err)
			}
			ev := e.audit.last(t)
			if ev.Kind != EventRelease || ev.Decision != DecisionDeny || ev.MigrationID != "m1" ||
				!slices.ContainsFunc(ev.Reasons, func(r string) bool { return strings.Contains(r, "exportable") }) {
				t.Errorf("audit event %+v, want a denied release of m1 naming the exportable key", ev)
			}
			if !e.transitKeyExists(live) {
				t.Errorf("the guest's live epoch key %s is gone", live)
			}
			if g := e.guest("vm1"); g.Epoch != 1 || g.Migration != nil || g.WrappedMDK == "" {
				t.Errorf("guest record after the refusal: %+v", g)
			}
			// The cleanup destroyed the keys of the refused release, the prepared one included:
			// its name is this migration's (claimed by vm1) or vm1's next epoch, which vm1 does
			// not live in and which no other migration holds.
			for _, k := range []string{migrationKeyName("m1"), epochKeyName("demo", "vm1", 2)} {
				if e.transitKeyExists(k) {
					t.Errorf("key %s left after the refused release", k)
				}
			}
			next := e.newMigration("m2", "vm1", "destination", e.signedPolicy(1, nil))
			if _, err := e.kb.Release(t.Context(), next.req); err != nil {
				t.Fatalf("the next release: %v", err)
			}
		})
	}
}

// TestAdoptRefusesPreparedEpochKey prepares an exportable key under the name of a new guest's
// first epoch key: the adoption is refused, and no MDK is drawn under it.
func TestAdoptRefusesPreparedEpochKey(t *testing.T) {
	e := newEnv(t)
	name := epochKeyName("demo", "vm9", 1)
	if _, err := e.admin.Logical().WriteWithContext(t.Context(), "transit/keys/"+name, map[string]any{"type": "aes256-gcm96", "exportable": true}); err != nil {
		t.Fatal(err)
	}
	a := e.attest("source", "adopt-vm9", attest.RoleAdopt, keybrokertest.CleanStatement(t))
	_, err := e.kb.Adopt(t.Context(), &kbwire.AdoptRequest{AdoptionID: "adopt-vm9", Tenant: "demo", VM: "vm9", Policy: e.signedPolicy(1, nil), Agent: a.att})
	if !errors.Is(err, ErrUnsafeKey) {
		t.Fatalf("Adopt with %s prepared = %v, want ErrUnsafeKey", name, err)
	}
	if ev := e.audit.last(t); ev.Kind != EventAdopt || ev.Decision != DecisionDeny {
		t.Errorf("audit event %+v, want a denied adoption", ev)
	}
	if e.transitKeyExists(name) {
		// The guest has no record, so no epoch of its can be live: the cleanup of the refused
		// adoption destroys the prepared key with the rest.
		t.Errorf("prepared key %s left after the refused adoption", name)
	}
}
