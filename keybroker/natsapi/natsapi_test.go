package natsapi_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/broker"
	"github.com/lethe-cc/lethe/internal/dsse"
	"github.com/lethe-cc/lethe/internal/natsauth"
	"github.com/lethe-cc/lethe/internal/natstest"
	"github.com/lethe-cc/lethe/internal/wireerr"
	"github.com/lethe-cc/lethe/keybroker"
	"github.com/lethe-cc/lethe/keybroker/kbclient"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/natsapi"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/policy"
)

// adminKey is the operator's admin key in tests; the keybroker pins its public half.
var adminKey = func() ed25519.PrivateKey {
	_, k, _ := ed25519.GenerateKey(rand.Reader)
	return k
}()

// adminSigned signs req as a tenant.register admin request with key.
func adminSigned(t *testing.T, key ed25519.PrivateKey, req kbwire.RegisterTenantRequest) []byte {
	t.Helper()
	return adminSignedAt(t, key, req, time.Now())
}

// adminSignedAt is adminSigned issued at now.
func adminSignedAt(t *testing.T, key ed25519.PrivateKey, req kbwire.RegisterTenantRequest, now time.Time) []byte {
	t.Helper()
	signed, err := kbwire.SignAdmin(kbwire.OpTenantRegister, req, now, time.Minute, key)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

// env is a keybroker on a real Vault (behind a proxy the test can cut) serving its API on a
// real NATS server, with tenant "demo" registered over NATS, and the broker's client of it.
type env struct {
	t         *testing.T
	proxy     *vaulttest.Proxy
	nc        *nats.Conn
	kbc       *broker.KeyBrokerClient
	client    *kbclient.Client
	plats     map[string]emulate.Platform
	tenantKey ed25519.PrivateKey
	policy    []byte
	// keys are the HPKE keys each platform attested with per migration: its erasure evidence
	// binds the same one, as an agent's does.
	keys map[[2]string]*seal.PrivateKey
	// ns is the NATS server; audit publishes the keybroker's audit events on it and counts
	// those it could not in auditFailed.
	ns          *natstest.Server
	audit       *natsapi.AuditPublisher
	auditFailed atomic.Int64
}

func newEnv(t *testing.T) *env {
	t.Helper()
	plats := keybrokertest.Platforms(t)
	v := keybrokertest.Verifier(t, plats)
	srv := vaulttest.Start(t)
	px, vc := srv.ProxiedClient(t)
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	e := &env{t: t, proxy: px, plats: plats}
	e.audit = &natsapi.AuditPublisher{Failed: func() { e.auditFailed.Add(1) }}
	kb, err := keybroker.New(keybroker.Config{
		Vault: vc, Verifier: v, AdminKey: adminKey.Public().(ed25519.PublicKey), StateDir: t.TempDir(),
		RetryInterval: 10 * time.Millisecond, Logger: log,
		Audit: keybroker.AuditSinks{keybroker.SlogAudit{Logger: log}, e.audit},
	})
	if err != nil {
		t.Fatal(err)
	}
	ns := natstest.Start(t, natstest.Options{})
	e.ns = ns
	e.audit.SetConn(ns.Connect(t))
	svc, err := natsapi.New(natsapi.Config{Conn: ns.Connect(t), Keybroker: kb, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errs := make(chan error, 2)
	go func() { errs <- kb.Run(ctx) }()
	go func() { errs <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		for range 2 {
			if err := <-errs; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	})
	select {
	case <-svc.Started():
	case err := <-errs:
		t.Fatalf("service ended before it started: %v", err)
	}

	// The keybroker answers only on its callers' inboxes: the broker's, the operators'.
	nc := ns.Connect(t, nats.CustomInboxPrefix(natsauth.InboxPrefix(natsauth.RoleBroker, "")))
	e.nc, e.kbc, e.client = nc, broker.NewKeyBrokerClient(nc, 0), kbclient.New(nc, 0)
	var pub ed25519.PublicKey
	pub, e.tenantKey, _ = ed25519.GenerateKey(rand.Reader)
	if _, err := e.client.RegisterTenant(t.Context(), adminSigned(t, adminKey, kbwire.RegisterTenantRequest{Tenant: "demo", PolicyKey: pub})); err != nil {
		t.Fatalf("registering tenant over NATS: %v", err)
	}
	y, err := os.ReadFile("../../examples/policies/ci-emulated.yaml")
	if err != nil {
		t.Fatal(err)
	}
	signed, err := policy.Sign("ci-emulated.yaml", y, e.tenantKey)
	if err != nil {
		t.Fatal(err)
	}
	if e.policy, err = signed.Marshal(); err != nil {
		t.Fatal(err)
	}
	return e
}

// agent is one side's HPKE key and evidence, made for a nonce asked over NATS.
type agent struct {
	key *seal.PrivateKey
	att kbwire.Attestation
}

func (e *env) attest(plat, id string, role attest.Role, statement []byte) *agent {
	e.t.Helper()
	n, err := e.kbc.Nonce(e.t.Context(), &kbwire.NonceRequest{MigrationID: id, Role: role})
	if err != nil {
		e.t.Fatalf("Nonce(%s, %s): %v", id, role, err)
	}
	k := e.keys[[2]string{plat, id}]
	if role != attest.RoleErased || k == nil {
		var err error
		if k, err = seal.GenerateKey(); err != nil {
			e.t.Fatal(err)
		}
	}
	if role == attest.RoleSource || role == attest.RoleDestination {
		if e.keys == nil {
			e.keys = map[[2]string]*seal.PrivateKey{}
		}
		e.keys[[2]string{plat, id}] = k
	}
	b := attest.Binding{MigrationID: id, Role: role, Nonce: n.Nonce, HPKEPublicKey: k.PublicKey(), Statement: statement}
	ev, err := attest.Produce(e.t.Context(), e.plats[plat], b)
	if err != nil {
		e.t.Fatal(err)
	}
	return &agent{key: k, att: kbwire.Attestation{Nonce: n.Nonce, Evidence: ev}}
}

// adopt gives vm its first residency, over NATS.
func (e *env) adopt(vm string) *kbwire.AdoptResponse {
	e.t.Helper()
	id := "adopt-" + vm
	a := e.attest("source", id, attest.RoleAdopt, keybrokertest.CleanStatement(e.t))
	resp, err := e.kbc.Adopt(e.t.Context(), &kbwire.AdoptRequest{AdoptionID: id, Tenant: "demo", VM: vm, Policy: e.policy, Agent: a.att})
	if err != nil {
		e.t.Fatalf("Adopt(%s): %v", vm, err)
	}
	return resp
}

// migration is a release request with its agents.
type migration struct {
	req      *kbwire.ReleaseRequest
	src, dst *agent
}

func (e *env) newMigration(id, vm, dstPlat string) *migration {
	e.t.Helper()
	src := e.attest("source", id, attest.RoleSource, nil)
	dst := e.attest(dstPlat, id, attest.RoleDestination, keybrokertest.CleanStatement(e.t))
	return &migration{
		req: &kbwire.ReleaseRequest{
			MigrationID: id, Tenant: "demo", VM: vm, Policy: e.policy,
			Source: src.att, Destination: dst.att, DestinationHost: kbwire.Host{Name: "host-b"},
		},
		src: src, dst: dst,
	}
}

// open opens a release's sealed keys with its agents' keys and returns TK and MDK.
func (m *migration) open(t *testing.T, resp *kbwire.ReleaseResponse) (tk, mdk []byte) {
	t.Helper()
	s, err := m.src.key.Open(m.req.MigrationID, attest.RoleSource, resp.SealedSource)
	if err != nil {
		t.Fatalf("opening the source's keys: %v", err)
	}
	d, err := m.dst.key.Open(m.req.MigrationID, attest.RoleDestination, resp.SealedDestination)
	if err != nil {
		t.Fatalf("opening the destination's keys: %v", err)
	}
	if !bytes.Equal(s.TK, d.TK) || len(d.MDK) == 0 {
		t.Fatalf("source and destination keys do not match")
	}
	return d.TK, d.MDK
}

// verify verifies a receipt with the public key fetched over NATS.
func (e *env) verify(raw []byte) *receipt.Receipt {
	e.t.Helper()
	pem, err := e.client.PublicKeyPEM(e.t.Context())
	if err != nil {
		e.t.Fatalf("PublicKeyPEM: %v", err)
	}
	pub, err := receipt.ParsePublicKeyPEM(pem)
	if err != nil {
		e.t.Fatal(err)
	}
	env, err := receipt.Parse(raw)
	if err != nil {
		e.t.Fatalf("parsing receipt: %v", err)
	}
	r, err := receipt.Verify(env, pub)
	if err != nil {
		e.t.Fatalf("verifying receipt: %v", err)
	}
	return r
}

// TestBrokerClientMigration drives a migration through the broker's keybroker client: nonce,
// release, a repeated release (the broker rerunning its step), destroy with erasure evidence
// and the commit acknowledgement, a repeated destroy, and the receipt.
func TestBrokerClientMigration(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")

	m := e.newMigration("m1", "vm1", "destination")
	rel, err := e.kbc.Release(ctx, m.req)
	if err != nil {
		t.Fatalf("Release: %v", err)
	}
	if rel.FromEpoch != 1 || rel.ToEpoch != 2 || rel.ZeroPageElision {
		t.Errorf("Release: epochs %d -> %d, zero-page elision %v; want 1 -> 2, false", rel.FromEpoch, rel.ToEpoch, rel.ZeroPageElision)
	}
	tk, mdk := m.open(t, rel)

	again := e.newMigration("m1", "vm1", "destination")
	rel2, err := e.kbc.Release(ctx, again.req)
	if err != nil {
		t.Fatalf("repeated Release: %v", err)
	}
	tk2, mdk2 := again.open(t, rel2)
	if rel2.WrappedMDK != rel.WrappedMDK || !bytes.Equal(tk, tk2) || !bytes.Equal(mdk, mdk2) {
		t.Errorf("the repeated release sealed other keys than the first")
	}

	erased := e.attest("source", "m1", attest.RoleErased, keybrokertest.ErasureStatement(t, "m1"))
	ack := keybrokertest.CommitAck(t, tk, "m1")
	destroy := &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit, Erasure: &erased.att, CommitAck: ack}
	d1, err := e.kbc.Destroy(ctx, destroy)
	if err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	r := e.verify(d1.Receipt)
	ackDigest := sha256.Sum256(ack)
	erD, dstD := erased.att.Evidence.Digest(), again.req.Destination.Evidence.Digest()
	type summary struct {
		Outcome     receipt.Outcome
		From, To    uint64
		Keys        []string
		CommitAck   []byte
		Erasure     []byte
		ErasureOK   bool
		Destination []byte
	}
	got := summary{Outcome: r.Outcome, From: r.FromEpoch, To: r.ToEpoch, CommitAck: r.CommitAckDigest, Destination: r.Destination.EvidenceDigest}
	for _, k := range r.DestroyedKeys {
		got.Keys = append(got.Keys, k.Name)
	}
	if r.Erasure != nil {
		got.Erasure, got.ErasureOK = r.Erasure.EvidenceDigest, r.Erasure.Accepted
	}
	want := summary{
		Outcome: receipt.OutcomeErased, From: 1, To: 2, Keys: []string{"lethe-mig-m1", "lethe-demo-vm1-e1"},
		CommitAck: ackDigest[:], Erasure: erD[:], ErasureOK: true, Destination: dstD[:],
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("receipt (-want +got):\n%s", diff)
	}

	// The broker reruns its commit step: a fresh erasure nonce and evidence, the same receipt.
	erased2 := e.attest("source", "m1", attest.RoleErased, keybrokertest.ErasureStatement(t, "m1"))
	destroy.Erasure = &erased2.att
	d2, err := e.kbc.Destroy(ctx, destroy)
	if err != nil {
		t.Fatalf("repeated Destroy: %v", err)
	}
	fetched, err := e.client.Receipt(ctx, "m1", false)
	if err != nil {
		t.Fatalf("Receipt: %v", err)
	}
	fetchedRaw, err := json.Marshal(fetched.Receipt)
	if err != nil {
		t.Fatal(err)
	}
	for name, raw := range map[string][]byte{"repeated destroy": d2.Receipt, "receipt op": fetchedRaw} {
		if diff := cmp.Diff(envelope(t, d1.Receipt), envelope(t, raw)); diff != "" {
			t.Errorf("%s: receipt differs from the first (-first +got):\n%s", name, diff)
		}
	}
}

func envelope(t *testing.T, raw []byte) *receipt.Envelope {
	t.Helper()
	env, err := receipt.Parse(raw)
	if err != nil {
		t.Fatalf("parsing receipt: %v", err)
	}
	return env
}

// code returns the wire code of an error from a client, or "" for none.
func code(err error) string {
	if err == nil {
		return ""
	}
	if e, ok := errors.AsType[*wireerr.Error](err); ok {
		return string(e.Code)
	}
	return "not a wire error: " + err.Error()
}

// TestErrorCodes checks the codes the keybroker answers over NATS and how the broker's
// client classifies them. Cases run in order: nonces are issued per (migration, role).
func TestErrorCodes(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	e.adopt("vm2")

	type outcome struct {
		Code        string
		Denied      bool
		Unavailable bool
	}
	var replay *kbwire.ReleaseRequest
	tests := []struct {
		name string
		call func() error
		want outcome
	}{
		{"denied by policy", func() error {
			m := e.newMigration("m1", "vm1", "weak")
			replay = m.req
			_, err := e.kbc.Release(ctx, m.req)
			return err
		}, outcome{"denied", true, false}},
		{"replayed nonces", func() error {
			_, err := e.kbc.Release(ctx, replay)
			return err
		}, outcome{"nonce_used", false, false}},
		{"unknown tenant", func() error {
			m := e.newMigration("m2", "vm1", "destination")
			m.req.Tenant = "nobody"
			_, err := e.kbc.Release(ctx, m.req)
			return err
		}, outcome{"unknown_tenant", true, false}},
		{"forged evidence", func() error {
			m := e.newMigration("m3", "vm1", "destination")
			m.req.Destination.Evidence.HPKEPublicKey = m.req.Source.Evidence.HPKEPublicKey
			_, err := e.kbc.Release(ctx, m.req)
			return err
		}, outcome{"evidence_rejected", true, false}},
		{"bad migration id", func() error {
			_, err := e.kbc.Nonce(ctx, &kbwire.NonceRequest{MigrationID: "../x", Role: attest.RoleSource})
			return err
		}, outcome{"invalid_request", false, false}},
		{"malformed request", func() error {
			msg, err := e.nc.RequestWithContext(ctx, natsapi.Subject(natsapi.OpRelease), []byte("{"))
			if err != nil {
				return err
			}
			return wireerr.New(wireerr.Code(msg.Header.Get(micro.ErrorCodeHeader)), msg.Header.Get(micro.ErrorHeader))
		}, outcome{"invalid_request", false, false}},
		{"commit without proof", func() error {
			m := e.newMigration("m5", "vm2", "destination")
			if _, err := e.kbc.Release(ctx, m.req); err != nil {
				return err
			}
			_, err := e.kbc.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: "m5", Tenant: "demo", VM: "vm2", Ending: kbwire.Commit, CommitAck: []byte(`{"migrationId":"m5"}`)})
			return err
		}, outcome{"unproven", false, false}},
		{"commit of an unknown migration", func() error {
			_, err := e.kbc.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: "m9", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit})
			return err
		}, outcome{"unknown_migration", false, false}},
		{"vault down during release", func() error {
			m := e.newMigration("m4", "vm2", "destination")
			e.proxy.Cut()
			defer e.proxy.Restore()
			_, err := e.kbc.Release(ctx, m.req)
			return err
		}, outcome{"unavailable", false, true}},
	}
	got, want := map[string]outcome{}, map[string]outcome{}
	for _, tt := range tests {
		err := tt.call()
		got[tt.name] = outcome{code(err), errors.Is(err, broker.ErrDenied), errors.Is(err, broker.ErrUnavailable)}
		want[tt.name] = tt.want
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("error codes (-want +got):\n%s", diff)
	}

	// The denied migration is aborted by the broker: the abort ends with a receipt.
	resp, err := e.kbc.Destroy(ctx, &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Abort})
	if err != nil {
		t.Fatalf("aborting the denied migration: %v", err)
	}
	if r := e.verify(resp.Receipt); r.Outcome != receipt.OutcomeAborted {
		t.Errorf("abort receipt outcome %s", r.Outcome)
	}
}

// TestDestructionPending: Vault is down at commit; the broker's client sees ErrUnavailable
// (it retries later), and the receipt follows once Vault is back.
func TestDestructionPending(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	e.adopt("vm1")
	m := e.newMigration("m1", "vm1", "destination")
	rel, err := e.kbc.Release(ctx, m.req)
	if err != nil {
		t.Fatalf("Release: %v", err)
	}
	tk, _ := m.open(t, rel)
	if _, err := e.client.PublicKeyPEM(ctx); err != nil { // creates the signing key
		t.Fatal(err)
	}
	erased := e.attest("source", "m1", attest.RoleErased, keybrokertest.ErasureStatement(t, "m1"))
	destroy := &kbwire.DestroyRequest{MigrationID: "m1", Tenant: "demo", VM: "vm1", Ending: kbwire.Commit, CommitAck: keybrokertest.CommitAck(t, tk, "m1"), Erasure: &erased.att}
	// Vault goes away once the commit is proven: while the keys are destroyed.
	e.proxy.Block(func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/transit/keys/") })
	_, err = e.kbc.Destroy(ctx, destroy)
	e.proxy.Cut()
	if code(err) != "destruction_pending" || !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("Destroy with Vault down = %v, want destruction_pending matching broker.ErrUnavailable", err)
	}
	_, err = e.client.Receipt(ctx, "m1", false)
	if !errors.Is(err, kbwire.CodeDestructionPending) {
		t.Fatalf("Receipt while pending = %v, want ErrDestructionPending", err)
	}
	e.proxy.Restore()
	waited, err := e.client.Receipt(ctx, "m1", true)
	if err != nil {
		t.Fatalf("Receipt with wait: %v", err)
	}
	raw, err := json.Marshal(waited.Receipt)
	if err != nil {
		t.Fatal(err)
	}
	if r := e.verify(raw); r.Outcome != receipt.OutcomeErased {
		t.Errorf("receipt outcome %s", r.Outcome)
	}
	// The broker's retry of its step now gets the receipt.
	again, err := e.kbc.Destroy(ctx, destroy)
	if err != nil {
		t.Fatalf("Destroy after Vault returned: %v", err)
	}
	if diff := cmp.Diff(waited.Receipt, envelope(t, again.Receipt)); diff != "" {
		t.Errorf("receipt (-awaited +destroy):\n%s", diff)
	}
}

func TestTenantRegister(t *testing.T) {
	e := newEnv(t)
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	_, notAdmin, _ := ed25519.GenerateKey(rand.Reader)
	tests := map[string]struct {
		signed []byte
		want   string
	}{
		"signed by another key": {adminSigned(t, notAdmin, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}), "unauthorized"},
		"not signed":            {nil, "unauthorized"},
		"bad key":               {adminSigned(t, adminKey, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub[:5]}), "invalid_request"},
		"registered":            {adminSigned(t, adminKey, kbwire.RegisterTenantRequest{Tenant: "acme", PolicyKey: pub}), ""},
	}
	got, want := map[string]string{}, map[string]string{}
	for name, tt := range tests {
		_, err := e.client.RegisterTenant(t.Context(), tt.signed)
		got[name], want[name] = code(err), tt.want
		if tt.want == "unauthorized" && !errors.Is(err, kbwire.CodeUnauthorized) {
			t.Errorf("%s: %v does not match kbwire.CodeUnauthorized", name, err)
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("tenant.register codes (-want +got):\n%s", diff)
	}
}

// TestTenantOps calls policy.publish and tenant.rotate-key over NATS.
func TestTenantOps(t *testing.T) {
	e := newEnv(t)
	resp, err := e.client.PublishPolicy(t.Context(), e.policy)
	if err != nil || resp.Tenant != "demo" || resp.Floor == 0 {
		t.Fatalf("policy.publish: %+v, %v", resp, err)
	}
	if _, err := e.client.PublishPolicy(t.Context(), []byte("{}")); code(err) != "invalid_request" {
		t.Errorf("policy.publish of garbage: %v", err)
	}
	newPub, _, _ := ed25519.GenerateKey(rand.Reader)
	cur := e.tenantKey.Public().(ed25519.PublicKey)
	signed, err := kbwire.SignRotation(&kbwire.KeyRotation{Tenant: "demo", CurrentKeyID: dsse.KeyID(cur), NewKey: newPub}, e.tenantKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.RotateKey(t.Context(), signed); err != nil {
		t.Fatalf("tenant.rotate-key: %v", err)
	}
	if _, err := e.client.RotateKey(t.Context(), signed); !errors.Is(err, kbwire.CodeUnauthorized) {
		t.Errorf("replayed tenant.rotate-key: %v, want unauthorized", err)
	}
}
