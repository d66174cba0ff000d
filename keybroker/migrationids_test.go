package keybroker

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestClaimMigrationID runs claims and ends of IDs against Vault, in order.
func TestClaimMigrationID(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	claim := func(id, vm string, fresh bool) error { return e.kb.claimMigrationID(ctx, id, "demo", vm, fresh) }
	steps := []struct {
		name string
		do   func() error
		want string // "" for no error, else a part of the ErrInvalidRequest's message
	}{
		{"first claim", func() error { return claim("m1", "vm1", true) }, ""},
		{"the same guest again", func() error { return claim("m1", "vm1", true) }, ""},
		{"another guest", func() error { return claim("m1", "vm2", false) }, "migration id m1 belongs to another guest"},
		{"another tenant's guest of the same name", func() error {
			return e.kb.claimMigrationID(ctx, "m1", "other", "vm1", false)
		}, "belongs to another guest"},
		{"end", func() error { return e.kb.endMigrationID(ctx, "m1") }, ""},
		{"end again", func() error { return e.kb.endMigrationID(ctx, "m1") }, ""},
		{"a fresh claim of an ended ID", func() error { return claim("m1", "vm1", true) }, "migration m1 has ended"},
		{"its guest, not fresh", func() error { return claim("m1", "vm1", false) }, ""},
		{"another guest of an ended ID", func() error { return claim("m1", "vm2", false) }, "belongs to another guest"},
		{"end of an ID never claimed", func() error { return e.kb.endMigrationID(ctx, "m9") }, "never claimed"},
	}
	for _, s := range steps {
		err := s.do()
		switch {
		case s.want == "" && err != nil:
			t.Errorf("%s: %v", s.name, err)
		case s.want != "" && (err == nil || !strings.Contains(err.Error(), s.want)):
			t.Errorf("%s: %v, want an error saying %q", s.name, err, s.want)
		case s.want != "" && s.want != "never claimed" && !errors.Is(err, ErrInvalidRequest):
			t.Errorf("%s: %v is not ErrInvalidRequest", s.name, err)
		}
	}
	var rec migrationIDRecord
	if _, err := e.kb.recs.get(ctx, migrationIDPath("m1"), &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Tenant != "demo" || rec.VM != "vm1" || !rec.Ended || rec.EndedAt.IsZero() {
		t.Errorf("record of m1: %+v", rec)
	}
}

// TestClaimMigrationIDConcurrently: guests racing for one ID, through two keybrokers on one
// Vault: exactly one wins it, and every later claim agrees.
func TestClaimMigrationIDConcurrently(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg
	cfg.StateDir = t.TempDir()
	kb2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		kb := e.kb
		if i%2 == 1 {
			kb = kb2
		}
		wg.Go(func() { errs[i] = kb.claimMigrationID(t.Context(), "race", "demo", fmt.Sprintf("vm%d", i), true) })
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("vm%d and vm%d both claimed the ID", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, ErrInvalidRequest):
			t.Errorf("vm%d: %v, want ErrInvalidRequest", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no guest claimed the ID")
	}
	var rec migrationIDRecord
	if _, err := e.kb.recs.get(t.Context(), migrationIDPath("race"), &rec); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(fmt.Sprintf("demo/vm%d", winner), rec.Tenant+"/"+rec.VM); diff != "" {
		t.Errorf("record owner (-winner +record):\n%s", diff)
	}
}

// TestReleaseClaimsMigrationID: a release claims its migration ID as fresh, so no release
// reuses another guest's ID or an ID that has ended.
func TestReleaseClaimsMigrationID(t *testing.T) {
	e := newEnv(t)
	m1, _, rel1 := e.released("m1", "vm1")
	e.adopt("vm2")

	// vm2 names vm1's live migration.
	before := e.transitKeys()
	theft := e.newMigration("m1", "vm2", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), theft.req); !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "belongs to another guest") {
		t.Fatalf("Release of another guest's migration ID = %v, want ErrInvalidRequest", err)
	}
	if ev := e.audit.last(t); ev.Kind != EventRelease || ev.Decision != DecisionDeny || ev.VM != "vm2" {
		t.Errorf("audit event %+v, want a release denial for vm2", ev)
	}
	if diff := cmp.Diff(before, e.transitKeys()); diff != "" {
		t.Fatalf("the refused release changed the keys (-before +after):\n%s", diff)
	}

	// m1 ends, then m2: m1 is not released again, though it is no longer the last migration.
	if _, err := e.kb.Destroy(t.Context(), e.commit(m1, rel1)); err != nil {
		t.Fatal(err)
	}
	m2 := e.newMigration("m2", "vm1", "destination", e.signedPolicy(1, nil))
	rel2, err := e.kb.Release(t.Context(), m2.req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.kb.Destroy(t.Context(), e.commit(m2, rel2)); err != nil {
		t.Fatal(err)
	}
	late := e.newMigration("m1", "vm1", "destination", e.signedPolicy(1, nil))
	if _, err := e.kb.Release(t.Context(), late.req); !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "has ended") {
		t.Fatalf("Release of an ended migration ID = %v, want ErrInvalidRequest: has ended", err)
	}
	if e.transitKeyExists("lethe-mig-m1") {
		t.Errorf("the refused release created lethe-mig-m1 again")
	}
}
