package broker_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/natsauth"
)

// TestTenantCannotForgetAnotherTenantsGuest: tenant globex, with its real NATS permissions,
// tries to forget acme's guest, whose VM is gone (so that nothing but the caller's identity
// stands in the way): naming acme in its own request finds nothing, and publishing on acme's
// subject or the operators' is a permission violation. acme's guest stays.
func TestTenantCannotForgetAnotherTenantsGuest(t *testing.T) {
	e := authEnv(t)
	e.standard()
	e.report("h1")
	ctx := t.Context()
	globex := e.tenant("globex")
	for name, req := range map[string]*broker.ForgetGuestRequest{
		"naming acme":           {Tenant: tenant, VM: vm, Reason: "mine now", Signed: signed},
		"in its own namespace":  {VM: vm, Signed: signed},
		"with acme's guest key": {VM: broker.GuestKey(tenant, vm), Signed: signed},
	} {
		if _, err := globex.ForgetGuest(ctx, req); err == nil || !errors.Is(err, broker.ErrNotFound) && !errors.Is(err, broker.ErrInvalid) {
			t.Errorf("globex forgetting acme's guest %s: %v, want not found or invalid", name, err)
		}
	}

	for _, subject := range []string{broker.TenantSubject(tenant, broker.OpGuestsForget), broker.OperatorSubject(broker.OpGuestsForget)} {
		nc, errs := connectAs(t, e, natsauth.RoleTenant, "globex")
		msg := nats.NewMsg(subject)
		msg.Data = []byte(`{"tenant":"acme","vm":"web","reason":"forged"}`)
		msg.Reply = nc.NewRespInbox()
		if err := nc.PublishMsg(msg); err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-errs:
			if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), subject) {
				t.Errorf("publishing on %s: %v, want a permission violation", subject, err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("no permission violation publishing on %s", subject)
		}
	}

	list, err := e.operator().ListGuests(ctx, &broker.ListGuestsRequest{Tenant: tenant})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Guests) != 1 || list.Guests[0].VM != vm {
		t.Fatalf("acme's guests after globex's attempts: %+v, want web", list.Guests)
	}
	// acme itself may.
	if _, err := e.tenant(tenant).ForgetGuest(ctx, &broker.ForgetGuestRequest{VM: vm, Reason: "deleted", Signed: signed}); err != nil {
		t.Errorf("acme forgetting its own guest: %v", err)
	}
}
