package keybroker

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
)

// stop holds the first call of a keybroker to Vault that match selects until the test lets it
// go: the seam through which these tests run one keybroker's request between two steps of
// another's. Transit decrypts and signs are held before they run, KV reads after.
type stop struct {
	match   func(op, name string) bool
	taken   atomic.Bool
	reached chan struct{} // closed once the call is held
	resume  chan struct{} // closed by go_
	once    sync.Once
}

// stopAt makes kb hold its first call that match selects ("decrypt" or "sign" of a Transit
// key, "get" of a KV path) until go_ is called; the test's cleanup lets it go too.
func stopAt(t *testing.T, kb *Keybroker, match func(op, name string) bool) *stop {
	s := &stop{match: match, reached: make(chan struct{}), resume: make(chan struct{})}
	kb.keys = stoppingKeys{kb.keys, s}
	kb.recs = stoppingRecs{kb.recs, s}
	t.Cleanup(s.go_)
	return s
}

func (s *stop) at(op, name string) {
	if s.match(op, name) && s.taken.CompareAndSwap(false, true) {
		close(s.reached)
		<-s.resume
	}
}

func (s *stop) go_() { s.once.Do(func() { close(s.resume) }) }

// wait returns once the call is held, or fails the test if done (the request's result) comes
// first.
func (s *stop) wait(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case <-s.reached:
	case err := <-done:
		t.Fatalf("the request ended (%v) before the call it was to be stopped at", err)
	}
}

type stoppingKeys struct {
	keyStore
	s *stop
}

func (k stoppingKeys) decrypt(ctx context.Context, name, wrapped string) ([]byte, error) {
	k.s.at("decrypt", name)
	return k.keyStore.decrypt(ctx, name, wrapped)
}

func (k stoppingKeys) sign(ctx context.Context, name string, msg []byte) ([]byte, error) {
	k.s.at("sign", name)
	return k.keyStore.sign(ctx, name, msg)
}

type stoppingRecs struct {
	recordStore
	s *stop
}

func (r stoppingRecs) get(ctx context.Context, path string, v any) (int, error) {
	ver, err := r.recordStore.get(ctx, path, v)
	r.s.at("get", path)
	return ver, err
}

// reissueOn starts a reissue of vm's key on kb, for an agent restarted on platform plat, and
// returns the channel its result comes on.
func (e *env) reissueOn(kb *Keybroker, id, vm, plat string) <-chan error {
	e.t.Helper()
	a := e.attest(plat, id, attest.RoleAdopt, keybrokertest.CleanStatement(e.t))
	req := &kbwire.ReissueRequest{ReissueID: id, Tenant: "demo", VM: vm, Policy: e.signedPolicy(1, nil), Agent: a.att}
	done := make(chan error, 1)
	go func() {
		_, err := kb.Reissue(e.t.Context(), req)
		done <- err
	}()
	return done
}

// TestAttackLogReissueRacesForget: a guest's agent restarts while the guest is forgotten, the
// reissue on one keybroker and the forget on another, on one Vault; the forget runs while the
// reissue is held at each step between its read of the guest's record and its log entry. A
// reissue entry after the forget's would make the guest's history fail its tenant's check, a
// false alarm of tampering that anyone able to restart an agent could raise. The forget is
// refused while the reissue holds the guest (and succeeds once it is done), or the reissue is
// refused; either way the history verifies.
func TestAttackLogReissueRacesForget(t *testing.T) {
	tests := map[string]struct {
		op, name string // the call the reissue is held at
		// forgetFirst: the forget goes through and the reissue must be refused; otherwise the
		// forget is refused until the reissue is done.
		forgetFirst bool
	}{
		"after reading the guest's record": {op: "get", name: guestPath("demo", "vm1"), forgetFirst: true},
		"after unwrapping the key":         {op: "sign", name: ReceiptSigningKey},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			ctx := t.Context()
			a, b := e.kb, e.second()
			e.adopt("vm1")
			s := stopAt(t, a, func(op, name string) bool { return op == tt.op && name == tt.name })
			done := e.reissueOn(a, "reissue-1", "vm1", "source")
			s.wait(t, done)

			forget := forgetRequest(t, e.tenantKey, true, "vm1", e.clock.Now())
			_, ferr := b.Forget(ctx, forget)
			s.go_()
			rerr := <-done
			switch {
			case tt.forgetFirst && (ferr != nil || !errors.Is(rerr, ErrNotAdopted)):
				t.Errorf("forget %v, reissue %v: want the forget, and the reissue refused (ErrNotAdopted)", ferr, rerr)
			case !tt.forgetFirst && (!errors.Is(ferr, ErrGuestBusy) || rerr != nil):
				t.Errorf("forget %v, reissue %v: want the forget refused (ErrGuestBusy) while the reissue is logged, and the reissue", ferr, rerr)
			}
			if ferr != nil {
				if _, err := b.Forget(ctx, forget); err != nil {
					t.Fatalf("forgetting once the reissue is done: %v", err)
				}
			}
			if e.transitKeyExists(epochKeyName("demo", "vm1", 1)) {
				t.Error("the forgotten guest's key is still in Vault")
			}
			rep, err := e.auditHistory(b, "vm1", nil)
			if err != nil {
				t.Fatalf("vm1's history does not verify: %v", err)
			}
			if got := kinds(rep); !strings.Contains(got, " forget:") || rep.Live != 0 {
				t.Errorf("vm1's history %s, live %d: want it forgotten", got, rep.Live)
			}
		})
	}
}

// TestAttackLogReissueRacesCommit: the same race with a migration's commit, which moves the
// guest to the next epoch and destroys the one a reissue unwrapped. A reissue of epoch 1 logged
// after the commit, or one of epoch 2 logged before it, would break the history. The commit
// waits (journaled, ErrGuestBusy) while a reissue holds the guest, and a reissue is refused
// while a commit is being logged; the history verifies.
func TestAttackLogReissueRacesCommit(t *testing.T) {
	t.Run("commit while a reissue is logged", func(t *testing.T) {
		e := newEnv(t)
		ctx := t.Context()
		a, b := e.kb, e.second()
		m, _, rel := e.released("m1", "vm1")
		commit := e.commit(m, rel)
		s := stopAt(t, a, func(op, name string) bool { return op == "sign" && name == ReceiptSigningKey })
		done := e.reissueOn(a, "reissue-1", "vm1", "source")
		s.wait(t, done)

		_, cerr := b.Destroy(ctx, commit)
		s.go_()
		if err := <-done; err != nil {
			t.Fatalf("reissue: %v", err)
		}
		if !errors.Is(cerr, ErrGuestBusy) {
			t.Errorf("commit while a reissue of epoch 1 is logged: %v, want ErrGuestBusy (journaled)", cerr)
		}
		if _, err := b.Destroy(ctx, commit); err != nil {
			t.Fatalf("commit once the reissue is done: %v", err)
		}
		rep, err := e.auditHistory(b, "vm1", nil)
		if err != nil {
			t.Fatalf("vm1's history does not verify: %v", err)
		}
		if got, want := kinds(rep), "adopt:adopt-vm1 release:m1 deny:m1 reissue:reissue-1 commit:m1"; got != want || rep.Live != 2 {
			t.Errorf("vm1's history %s, live %d; want %s, live 2", got, rep.Live, want)
		}
	})
	t.Run("reissue while a commit is logged", func(t *testing.T) {
		e := newEnv(t)
		ctx := t.Context()
		a, b := e.kb, e.second()
		m, _, rel := e.released("m1", "vm1")
		commit := e.commit(m, rel)
		// The commit is held at its receipt's signature: the guest is in epoch 2, epoch 1's
		// key is gone, and the commit is not logged yet.
		s := stopAt(t, b, func(op, name string) bool { return op == "sign" && name == ReceiptSigningKey })
		done := make(chan error, 1)
		go func() {
			_, err := b.Destroy(ctx, commit)
			done <- err
		}()
		s.wait(t, done)

		rerr := <-e.reissueOn(a, "reissue-1", "vm1", "destination")
		s.go_()
		if err := <-done; err != nil {
			t.Fatalf("commit: %v", err)
		}
		if !errors.Is(rerr, ErrGuestBusy) {
			t.Errorf("reissue while the commit is logged: %v, want ErrGuestBusy", rerr)
		}
		if err := <-e.reissueOn(a, "reissue-2", "vm1", "destination"); err != nil {
			t.Fatalf("reissue once the commit is logged: %v", err)
		}
		rep, err := e.auditHistory(b, "vm1", nil)
		if err != nil {
			t.Fatalf("vm1's history does not verify: %v", err)
		}
		if got, want := kinds(rep), "adopt:adopt-vm1 release:m1 deny:reissue-1 commit:m1 reissue:reissue-2"; got != want || rep.Live != 2 {
			t.Errorf("vm1's history %s, live %d; want %s, live 2", got, rep.Live, want)
		}
	})
}

// TestReissuesOfOneGuest: of two reissues of one guest at once, on two keybrokers, the second
// is refused while the first holds the guest, and goes through once it is done.
func TestReissuesOfOneGuest(t *testing.T) {
	e := newEnv(t)
	a, b := e.kb, e.second()
	e.adopt("vm1")
	s := stopAt(t, a, func(op, name string) bool { return op == "sign" && name == ReceiptSigningKey })
	done := e.reissueOn(a, "reissue-1", "vm1", "source")
	s.wait(t, done)
	if err := <-e.reissueOn(b, "reissue-2", "vm1", "source"); !errors.Is(err, ErrGuestBusy) {
		t.Errorf("a second reissue while the first holds the guest: %v, want ErrGuestBusy", err)
	}
	s.go_()
	if err := <-done; err != nil {
		t.Fatalf("the first reissue: %v", err)
	}
	if err := <-e.reissueOn(b, "reissue-3", "vm1", "source"); err != nil {
		t.Fatalf("a reissue once the first is done: %v", err)
	}
	if g := e.guest("vm1"); g.Reissuing != nil {
		t.Errorf("a reissue's hold outlived it: %+v", g.Reissuing)
	}
	rep, err := e.auditHistory(b, "vm1", nil)
	if err != nil {
		t.Fatalf("vm1's history does not verify: %v", err)
	}
	if got, want := kinds(rep), "adopt:adopt-vm1 deny:reissue-2 reissue:reissue-1 reissue:reissue-3"; got != want {
		t.Errorf("vm1's history %s, want %s", got, want)
	}
}

// TestForgetAfterReissuerDied: a keybroker that dies in a reissue after its entry is written,
// before it clears its hold on the guest, holds the guest's forget back until the hold lapses
// (reissueHold), and no longer; the history then verifies.
func TestForgetAfterReissuerDied(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	var writes atomic.Int32
	e.proxy.Block(func(r *http.Request) bool {
		// The marker goes through, its clearing does not.
		return r.Method != http.MethodGet && strings.Contains(r.URL.Path, "/data/guests/demo/vm1") && writes.Add(1) > 1
	})
	err := <-e.reissueOn(e.kb, "reissue-1", "vm1", "source")
	e.proxy.Restore()
	if err != nil {
		t.Fatalf("reissue: %v", err)
	}
	if g := e.guest("vm1"); g.Reissuing == nil || g.Reissuing.ID != "reissue-1" {
		t.Fatalf("the dead reissue's hold is not in the guest's record: %+v", g)
	}

	b := e.second()
	forget := forgetRequest(t, e.tenantKey, true, "vm1", e.clock.Now())
	e.clock.Advance(reissueHold - time.Second)
	if _, err := b.Forget(ctx, forget); !errors.Is(err, ErrGuestBusy) || !strings.Contains(err.Error(), "reissue-1") {
		t.Fatalf("forget while the dead reissue's hold lasts: %v, want ErrGuestBusy naming reissue-1", err)
	}
	e.clock.Advance(time.Second)
	if _, err := b.Forget(ctx, forget); err != nil {
		t.Fatalf("forget once the hold lapsed: %v", err)
	}
	if g := e.guest("vm1"); g.Epoch != 0 || g.Reissuing != nil {
		t.Errorf("guest record after the forget: %+v", g)
	}
	rep, err := e.auditHistory(b, "vm1", nil)
	if err != nil {
		t.Fatalf("vm1's history does not verify: %v", err)
	}
	if got := kinds(rep); !strings.HasPrefix(got, "adopt:adopt-vm1 reissue:reissue-1 deny:forget-") || !strings.Contains(got, " forget:forget-") || rep.Live != 0 {
		t.Errorf("vm1's history %s, live %d", got, rep.Live)
	}
}
