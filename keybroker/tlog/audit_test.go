package tlog

import (
	"errors"
	"strings"
	"testing"
)

// TestAudit: a monitor holding every leaf checks every guest's chain, so a history withheld in
// part from a tenant, or a log whose leaves were rewritten, shows.
func TestAudit(t *testing.T) {
	l := buildLog(t, guestHistory())
	cp := l.checkpoint()

	rep, err := Audit(cp, l.leaves)
	if err != nil {
		t.Fatalf("Audit of an honest log: %v", err)
	}
	var vm1 *GuestAudit
	for i := range rep.Guests {
		if rep.Guests[i].Tenant == "acme" && rep.Guests[i].VM == "vm1" {
			vm1 = &rep.Guests[i]
		}
	}
	if vm1 == nil || vm1.Entries != len(guestHistory()) || vm1.NewestSeq != uint64(len(guestHistory())) || vm1.Report.Live != 3 {
		t.Fatalf("acme/vm1 in the audit: %+v", vm1)
	}

	// A tenant shown its history without the newest entry sees a complete chain; the
	// monitor's count says there is one more.
	_, h := l.history("acme", "vm1")
	h.Entries = h.Entries[:len(h.Entries)-1]
	if _, err := VerifyHistory(cp, h); err != nil {
		t.Fatalf("a history cut short at its end verifies on its own (as documented): %v", err)
	}
	if got := len(h.Entries); got >= vm1.Entries {
		t.Errorf("the monitor counts %d entries of acme/vm1, the cut history %d", vm1.Entries, got)
	}

	t.Run("a guest's chain with a gap", func(t *testing.T) {
		l := newTestLog(t)
		l.add(Entry{Kind: KindAdopt, Tenant: "acme", VM: "vm2", MigrationID: "adopt-2", ToEpoch: 1, Host: "h1"})
		l.seqs["acme/vm2"]++ // an entry of seq 2 that is not in the log
		l.add(Entry{Kind: KindDeny, Tenant: "acme", VM: "vm2", MigrationID: "m", Op: "release"})
		l.add(Entry{Kind: KindAdopt, Tenant: "acme", VM: "vm3", MigrationID: "adopt-3", ToEpoch: 1, Host: "h1"})
		rep, err := Audit(l.checkpoint(), l.leaves)
		if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "acme/vm2") || strings.Contains(err.Error(), "acme/vm3") {
			t.Fatalf("Audit = %v, want ErrIncomplete naming acme/vm2 only", err)
		}
		if rep.Guests[0].Err == nil || rep.Guests[1].Err != nil {
			t.Errorf("per guest: vm2 %v, vm3 %v", rep.Guests[0].Err, rep.Guests[1].Err)
		}
	})
	t.Run("leaves that are not the checkpoint's", func(t *testing.T) {
		swapped := append([][]byte(nil), l.leaves...)
		swapped[1], swapped[2] = swapped[2], swapped[1]
		if _, err := Audit(cp, swapped); !errors.Is(err, ErrInconsistent) {
			t.Errorf("reordered leaves: %v, want ErrInconsistent", err)
		}
		if _, err := Audit(cp, l.leaves[:len(l.leaves)-1]); !errors.Is(err, ErrInconsistent) {
			t.Errorf("a leaf short: %v, want ErrInconsistent", err)
		}
	})
}
