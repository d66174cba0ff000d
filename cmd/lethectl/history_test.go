package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
)

// seedHistory writes n ended migrations of tenant, and their receipts, straight into the
// broker's buckets.
func seedHistory(t *testing.T, f *fleet, tenant string, n int) {
	t.Helper()
	ctx := context.Background()
	js, err := jetstream.New(f.connect(natsauth.RoleBrokerStore, ""))
	if err != nil {
		t.Fatal(err)
	}
	migs, err := js.KeyValue(ctx, broker.MigrationsBucket)
	if err != nil {
		t.Fatal(err)
	}
	receipts, err := js.KeyValue(ctx, broker.ReceiptsBucket)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for i := range n {
		id := fmt.Sprintf("mig-%s-%04d", tenant, i)
		m, err := json.Marshal(broker.Migration{ID: id, Tenant: tenant, VM: "web", Source: "h1", Destination: "h2",
			Platform: attest.PlatformEmulatedSEVSNP, Phase: broker.PhaseErased, Created: now.Add(time.Duration(i) * time.Millisecond), Finished: now})
		if err != nil {
			t.Fatal(err)
		}
		r, err := json.Marshal(broker.Receipt{MigrationID: id, Tenant: tenant, VM: "web", Outcome: broker.OutcomeErased, Envelope: json.RawMessage(`{"payload":"x"}`), Stored: now})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := migs.Put(ctx, id, m); err != nil {
			t.Fatal(err)
		}
		if _, err := receipts.Put(ctx, id, r); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMigrationsListPagesAndReceiptExport lists a history of 250 migrations a page at a time
// and whole, and exports the tenant's 250 receipts, none of another tenant's.
func TestMigrationsListPagesAndReceiptExport(t *testing.T) {
	f := newFleet(t)
	seedHistory(t, f, "acme", 250)
	seedHistory(t, f, "other", 3)

	out, errOut, code := f.run("migrations", "list", "--tenant", "acme", "--limit", "100")
	if rows := strings.Count(out, "\n") - 1; code != 0 || rows != 100 || !strings.Contains(errOut, "More migrations: --after ") {
		t.Errorf("one page: exit %d, %d rows, stderr %q; want 100 rows and a hint", code, rows, errOut)
	}
	out, errOut, code = f.run("migrations", "list", "--tenant", "acme", "--limit", "100", "--all", "-o", "json")
	var all broker.ListMigrationsResponse
	if err := json.Unmarshal([]byte(out), &all); code != 0 || err != nil || len(all.Migrations) != 250 || all.Next != "" {
		t.Errorf("--all -o json: exit %d (%s), %v, %d migrations, next %q; want 250 and no next", code, errOut, err, len(all.Migrations), all.Next)
	}

	out, errOut, code = f.run("receipt", "export", "--tenant", "acme")
	if code != 0 {
		t.Fatalf("receipt export: exit %d: %s", code, errOut)
	}
	n := 0
	for sc := bufio.NewScanner(strings.NewReader(out)); sc.Scan(); n++ {
		var r broker.Receipt
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.Tenant != "acme" || len(r.Envelope) == 0 {
			t.Fatalf("line %d: %v, %+v; want an acme receipt with its envelope", n+1, err, r)
		}
	}
	if n != 250 {
		t.Errorf("receipt export wrote %d lines, want 250", n)
	}
}
