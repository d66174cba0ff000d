package broker

import (
	"slices"
	"testing"
	"time"
)

func liveIDs(v *liveView) []string {
	var ids []string
	for _, m := range v.records() {
		ids = append(ids, m.ID)
	}
	slices.Sort(ids)
	return ids
}

func rec(id string, rev uint64) liveRecord {
	return liveRecord{m: &Migration{ID: id, Updated: time.Unix(int64(rev), 0)}, rev: rev}
}

// TestLiveViewFill fills a view the watch has fed with a listing: a record the watch
// delivered at a later revision than the listing read stays at it; one the listing lacks is
// gone unless the watch delivered it after the listing began; the listing's others come in.
func TestLiveViewFill(t *testing.T) {
	v := newLiveView()
	v.put("newer", rec("newer", 12).m, 12) // rewritten after the listing read it at 5
	v.put("purged", rec("purged", 3).m, 3) // archived by another broker: no marker
	v.put("created", rec("created", 11).m, 11)
	v.put("same", rec("same", 4).m, 4)
	listed := map[string]liveRecord{"newer": rec("newer", 5), "same": rec("same", 4), "listed": rec("listed", 7)}
	v.fill(listed, time.Now(), 10)
	if got, want := liveIDs(v), []string{"created", "listed", "newer", "same"}; !slices.Equal(got, want) {
		t.Fatalf("view holds %v, want %v", got, want)
	}
	if r := v.recs["newer"]; r.rev != 12 {
		t.Errorf("record newer at revision %d, want the watch's 12", r.rev)
	}

	v.remove("newer", 11) // a purge up to a revision before the record's
	v.remove("same", 4)
	if got, want := liveIDs(v), []string{"created", "listed", "newer"}; !slices.Equal(got, want) {
		t.Errorf("after removals the view holds %v, want %v", got, want)
	}
	v.put("listed", rec("listed", 6).m, 6) // an older revision delivered late
	if r := v.recs["listed"]; r.rev != 7 {
		t.Errorf("record listed at revision %d after a late older one, want 7", r.rev)
	}
}

// TestLiveViewDue: a view is listed before its first read, after every new watch, and every
// interval; not otherwise.
func TestLiveViewDue(t *testing.T) {
	v := newLiveView()
	t0 := time.Unix(1000, 0)
	if !v.due(t0, time.Minute) {
		t.Fatal("a view never listed is not due")
	}
	v.watchBegan(t0)
	v.fill(map[string]liveRecord{}, t0.Add(time.Second), 0)
	if v.due(t0.Add(2*time.Second), time.Minute) {
		t.Error("a view listed after its watch began is due again at once")
	}
	if !v.due(t0.Add(61*time.Second), time.Minute) {
		t.Error("a view listed more than an interval ago is not due")
	}
	v.watchBegan(t0.Add(3 * time.Second))
	if !v.due(t0.Add(4*time.Second), time.Minute) {
		t.Error("a view whose watch began again after its listing is not due")
	}
}
