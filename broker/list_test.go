package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/nats-io/nats.go/jetstream"
)

// natsMaxPayload is nats-server's default maximum payload, which a reply must fit.
const natsMaxPayload = 1 << 20

// seedMigrations writes n finished migration records of tenant straight into bucket, each
// about recordBytes long once encoded, created one second apart (every tenth shares its
// predecessor's time, so that ties are ordered by id), and returns their ids.
func seedMigrations(t testing.TB, kv jetstream.KeyValue, tenant string, n, recordBytes int, start time.Time) []string {
	t.Helper()
	ctx := context.Background()
	ids := make([]string, n)
	created := start
	for i := range n {
		if i%10 != 0 {
			created = created.Add(time.Second)
		}
		m := broker.Migration{
			ID: fmt.Sprintf("mig-%s-%06d", tenant, i), Tenant: tenant, VM: fmt.Sprintf("vm%d", i%50),
			Source: "h1", Destination: "h2", Platform: attest.PlatformEmulatedSEVSNP, Phase: broker.PhaseErased, Outcome: broker.OutcomeErased,
			Created: created, PhaseSince: created, Updated: created, Finished: created,
			Timeline: []broker.PhaseEntry{{Phase: broker.PhaseRequested, Entered: created}, {Phase: broker.PhaseErased, Entered: created}},
		}
		data, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if pad := recordBytes - len(data); pad > 0 {
			m.Notes = []string{strings.Repeat("n", pad)}
			data, _ = json.Marshal(m)
		}
		if _, err := kv.Put(ctx, m.ID, data); err != nil {
			t.Fatal(err)
		}
		ids[i] = m.ID
	}
	return ids
}

// TestListMigrationsPages lists 2,000 migrations in pages: every one appears once, newest
// first, and no page's reply passes NATS's payload limit, even at the largest limit and with
// records large enough that the limit alone would pass it.
func TestListMigrationsPages(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.startBroker("b1")
	const n = 2000
	kv := e.kv(broker.MigrationsBucket)
	ids := seedMigrations(t, kv, tenant, n, 1300, e.clock.Now().Add(-30*time.Minute))
	big := seedMigrations(t, kv, "bigco", 600, 4000, e.clock.Now().Add(-30*time.Minute))
	ctx := context.Background()

	for _, tc := range []struct {
		name   string
		client *broker.Client
		limit  int
		want   []string
	}{
		{"tenant, default limit", e.tenant(tenant), 0, ids},
		{"tenant, largest limit", e.tenant(tenant), broker.MaxListLimit, ids},
		{"operator, large records", e.operator(), broker.MaxListLimit, big},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := &broker.ListMigrationsRequest{Limit: tc.limit}
			if tc.name == "operator, large records" {
				req.Tenant = "bigco"
			}
			var got []string
			var prev *broker.Migration
			for pages := 0; ; pages++ {
				if pages > len(tc.want) {
					t.Fatal("listing does not end")
				}
				resp, err := tc.client.ListMigrations(ctx, req)
				if err != nil {
					t.Fatal(err)
				}
				data, _ := json.Marshal(resp)
				if len(data) > natsMaxPayload {
					t.Fatalf("page %d is %d bytes, over NATS's %d", pages, len(data), natsMaxPayload)
				}
				if lim := max(tc.limit, broker.DefaultListLimit); len(resp.Migrations) > lim {
					t.Fatalf("page %d has %d migrations, over the limit %d", pages, len(resp.Migrations), lim)
				}
				for _, m := range resp.Migrations {
					if prev != nil && (m.Created.After(prev.Created) || m.Created.Equal(prev.Created) && m.ID > prev.ID) {
						t.Fatalf("%s (%s) listed after %s (%s): not newest first", m.ID, m.Created, prev.ID, prev.Created)
					}
					prev = m
					got = append(got, m.ID)
				}
				if resp.Next == "" {
					break
				}
				req.After = resp.Next
			}
			seen := map[string]int{}
			for _, id := range got {
				seen[id]++
			}
			for _, id := range tc.want {
				if seen[id] != 1 {
					t.Errorf("%s listed %d times", id, seen[id])
				}
			}
			if len(got) != len(tc.want) {
				t.Errorf("listed %d migrations, want %d", len(got), len(tc.want))
			}
		})
	}

	all, err := e.tenant(tenant).ListAllMigrations(ctx, broker.ListMigrationsRequest{VM: "vm7", State: broker.ListEnded})
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != n/50 {
		t.Errorf("ListAllMigrations of vm7: %d migrations, want %d", len(all), n/50)
	}
	if active, err := e.tenant(tenant).ListMigrations(ctx, &broker.ListMigrationsRequest{State: broker.ListActive}); err != nil || len(active.Migrations) != 0 {
		t.Errorf("active migrations: %v, %v; want none", active, err)
	}
	for _, bad := range []broker.ListMigrationsRequest{{Limit: broker.MaxListLimit + 1}, {After: "not a token"}, {State: "running"}} {
		if _, err := e.tenant(tenant).ListMigrations(ctx, &bad); !errors.Is(err, broker.ErrInvalid) {
			t.Errorf("ListMigrations(%+v): %v, want ErrInvalid", bad, err)
		}
	}
}

// TestListReceiptsPages lists a tenant's 600 receipts in pages: each once, by migration id,
// none of another tenant's.
func TestListReceiptsPages(t *testing.T) {
	e := newEnv(t, natstest.Options{})
	e.startBroker("b1")
	ctx := t.Context()
	kv := e.kv(broker.ReceiptsBucket)
	put := func(tenant string, i int) {
		r := broker.Receipt{MigrationID: fmt.Sprintf("mig-%s-%04d", tenant, i), Tenant: tenant, VM: "web", Outcome: broker.OutcomeErased,
			Envelope: json.RawMessage(`"` + strings.Repeat("e", 2000) + `"`), Stored: e.clock.Now()}
		data, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, r.MigrationID, data); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 600 {
		put(tenant, i)
	}
	put("other", 0)
	req := &broker.ListReceiptsRequest{}
	var got []string
	for pages := 0; ; pages++ {
		resp, err := e.tenant(tenant).ListReceipts(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Receipts) > broker.DefaultListLimit || pages > 600 {
			t.Fatalf("page %d: %d receipts", pages, len(resp.Receipts))
		}
		for _, r := range resp.Receipts {
			got = append(got, r.MigrationID)
		}
		if resp.Next == "" {
			break
		}
		req.After = resp.Next
	}
	if len(got) != 600 {
		t.Fatalf("listed %d receipts, want 600", len(got))
	}
	for i, id := range got {
		if want := fmt.Sprintf("mig-%s-%04d", tenant, i); id != want {
			t.Fatalf("receipt %d is %s, want %s", i, id, want)
		}
	}
}
