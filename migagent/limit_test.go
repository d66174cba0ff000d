package migagent

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"errors"
	"log/slog"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/migagent/agentapi"
)

// TestTheLimitOfMigrationsInFlightIsStrictAndAdvertised: the agent states its limit
// (Config.MaxMigrations) in its host record, and holds it while a preparation is under way:
// a new migration's preparation is in the node's map only once it is prepared, and an
// attestation meanwhile must not take the place it holds. An adoption that ended (its guest
// has its key) takes no place.
func TestTheLimitOfMigrationsInFlightIsStrictAndAdvertised(t *testing.T) {
	kb, _, _ := ed25519.GenerateKey(rand.Reader)
	chip := sha512.Sum512([]byte("host-l"))
	plat, err := emulate.Open(t.TempDir(), attest.PlatformEmulatedSEVSNP, emulate.Options{ChipID: chip[:]})
	if err != nil {
		t.Fatal(err)
	}
	n, err := New(Config{
		Host: "host-l", Conn: &nats.Conn{}, Attester: plat, KeybrokerKey: kb, WorkloadRate: -1, MaxMigrations: 2,
		Guests: []GuestSpec{{Tenant: "demo", VM: "a", MemoryBytes: 1 << 20}, {Tenant: "demo", VM: "b", MemoryBytes: 1 << 20}},
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.closeGuests)
	if got := n.record().MaxMigrations; got != 2 {
		t.Errorf("the host record states a limit of %d migrations, want 2", got)
	}
	nonce := func() []byte {
		b := make([]byte, 32)
		rand.Read(b)
		return b
	}
	// An adoption counts while it attests, not once its guest has its key.
	if _, err := n.Attest(t.Context(), &agentapi.AttestRequest{MigrationID: "adopt-a", Role: attest.RoleAdopt, Nonce: nonce(), Tenant: "demo", VM: "a"}); err != nil {
		t.Fatal(err)
	}
	adoption, err := n.lookup("adopt-a")
	if err != nil {
		t.Fatal(err)
	}
	adoption.mu.Lock()
	err = adoption.enter(phaseAdopted)
	adoption.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	attestSource := func(id, vm string) error {
		_, err := n.Attest(t.Context(), &agentapi.AttestRequest{MigrationID: id, Role: attest.RoleSource, Nonce: nonce(), Tenant: "demo", VM: vm})
		return err
	}
	if err := attestSource("m-1", "a"); err != nil {
		t.Fatal(err)
	}

	// A preparation takes the second place and pauses before it is in the node's map.
	ctx := newPausingCtx(t.Context())
	prepared := make(chan error, 1)
	go func() {
		_, err := n.Prepare(ctx, &agentapi.PrepareRequest{MigrationID: "m-2", Nonce: nonce(), Tenant: "demo", VM: "in", MemoryBytes: 1 << 20})
		prepared <- err
	}()
	select {
	case <-ctx.reached:
	case err := <-prepared:
		t.Fatalf("the second migration's preparation ended before it paused: %v", err)
	}
	if err := attestSource("m-3", "b"); !errors.Is(err, agentapi.ErrConflict) {
		t.Errorf("a third migration while the second is being prepared: %v, want a conflict", err)
	}
	close(ctx.release)
	if err := <-prepared; err != nil {
		t.Fatalf("preparing the second migration: %v", err)
	}
	if err := attestSource("m-3", "b"); !errors.Is(err, agentapi.ErrConflict) {
		t.Errorf("a third migration beside two in flight: %v, want a conflict", err)
	}

	// One ending makes room.
	if _, err := n.Abort(t.Context(), &agentapi.AbortRequest{MigrationID: "m-1", Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	if err := attestSource("m-3", "b"); err != nil {
		t.Errorf("a migration after another ended: %v", err)
	}
}
