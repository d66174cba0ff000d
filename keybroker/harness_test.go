package keybroker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/keybroker/keybrokertest"
	"github.com/lethe-cc/lethe/keybroker/seal"
	"github.com/lethe-cc/lethe/keybroker/vaulttest"
	"github.com/lethe-cc/lethe/policy"
)

// testAdminKey is the operator's admin key in tests; the keybroker pins its public half.
var testAdminKey = func() ed25519.PrivateKey {
	_, k, _ := ed25519.GenerateKey(rand.Reader)
	return k
}()

// adminRequest signs req as an admin statement for op with key, issued now, valid 5 minutes.
func adminRequest(t testing.TB, key ed25519.PrivateKey, op string, req any, now time.Time) *kbwire.AdminRequest {
	t.Helper()
	signed, err := kbwire.SignAdmin(op, req, now, kbwire.MaxAdminValidity, key)
	if err != nil {
		t.Fatal(err)
	}
	return &kbwire.AdminRequest{Signed: signed}
}

// recordingAudit keeps audit events for assertions.
type recordingAudit struct {
	mu     sync.Mutex
	events []Event
}

func (r *recordingAudit) Audit(_ context.Context, ev Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, ev)
}

func (r *recordingAudit) all() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.events...)
}

func (r *recordingAudit) last(t *testing.T) Event {
	t.Helper()
	evs := r.all()
	if len(evs) == 0 {
		t.Fatal("no audit event")
	}
	return evs[len(evs)-1]
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// env is a keybroker on a real Vault (behind a proxy the test can cut), emulated SEV-SNP
// platforms, the real verifier and the real policy package, with tenant "demo" registered.
type env struct {
	t         testing.TB
	vault     *vaulttest.Server
	proxy     *vaulttest.Proxy
	admin     *api.Client // straight to Vault, not through the proxy
	kb        *Keybroker
	audit     *recordingAudit
	clock     *clock
	plats     map[string]emulate.Platform
	verifier  *attest.Verifier
	tenantKey ed25519.PrivateKey
	stateDir  string
	cfg       Config
	// keys are the HPKE keys each platform attested with per migration: its erasure evidence
	// binds the same one, as an agent's does.
	keys map[[2]string][]*seal.PrivateKey
}

type envOption func(*Config)

func newEnv(t testing.TB, opts ...envOption) *env {
	t.Helper()
	plats := keybrokertest.Platforms(t)
	v := keybrokertest.Verifier(t, plats)
	srv := vaulttest.Start(t)
	px, c := srv.ProxiedClient(t)
	e := &env{
		t: t, vault: srv, proxy: px, admin: srv.Client, audit: &recordingAudit{},
		clock: &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}, plats: plats, verifier: v,
		stateDir: t.TempDir(),
	}
	_, e.tenantKey, _ = ed25519.GenerateKey(rand.Reader)
	e.cfg = Config{
		Vault: c, Verifier: v, Audit: e.audit, AdminKey: testAdminKey.Public().(ed25519.PublicKey),
		StateDir: e.stateDir, Now: e.clock.Now, RetryInterval: 10 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
	for _, o := range opts {
		o(&e.cfg)
	}
	var err error
	if e.kb, err = New(e.cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.kb.rlog.waitIdle() }) // before Vault stops
	pub := e.tenantKey.Public().(ed25519.PublicKey)
	if _, err := e.kb.RegisterTenant(t.Context(), adminRequest(t, testAdminKey, kbwire.OpTenantRegister, kbwire.RegisterTenantRequest{Tenant: "demo", PolicyKey: pub}, e.clock.Now())); err != nil {
		t.Fatalf("registering tenant: %v", err)
	}
	return e
}

// signedPolicy returns the CI policy for tenant demo with policySvn svn, signed by the
// tenant. edit, if not nil, rewrites the YAML first.
func (e *env) signedPolicy(svn uint64, edit func(string) string) []byte {
	e.t.Helper()
	b, err := os.ReadFile("../examples/policies/ci-emulated.yaml")
	if err != nil {
		e.t.Fatal(err)
	}
	y := strings.Replace(string(b), "policySvn: 1", "policySvn: "+strconv.FormatUint(svn, 10), 1)
	if edit != nil {
		y = edit(y)
	}
	env, err := policy.Sign("ci-emulated.yaml", []byte(y), e.tenantKey)
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := env.Marshal()
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// agent is one side's ephemeral key and evidence.
type agent struct {
	key *seal.PrivateKey
	att kbwire.Attestation
}

// attest makes evidence on platform plat for (id, role): a fresh HPKE key, a nonce from the
// keybroker and the statement.
func (e *env) attest(plat, id string, role attest.Role, statement []byte) *agent {
	e.t.Helper()
	var k *seal.PrivateKey
	if role == attest.RoleErased {
		k = e.releasedKey(plat, id)
	}
	if k == nil {
		var err error
		if k, err = seal.GenerateKey(); err != nil {
			e.t.Fatal(err)
		}
	}
	if role == attest.RoleSource || role == attest.RoleDestination {
		if e.keys == nil {
			e.keys = map[[2]string][]*seal.PrivateKey{}
		}
		e.keys[[2]string{plat, id}] = append(e.keys[[2]string{plat, id}], k)
	}
	n, err := e.kb.IssueNonce(e.t.Context(), kbwire.NonceRequest{MigrationID: id, Role: role})
	if err != nil {
		e.t.Fatal(err)
	}
	b := attest.Binding{MigrationID: id, Role: role, Nonce: n.Nonce, HPKEPublicKey: k.PublicKey(), Statement: statement}
	ev, err := attest.Produce(e.t.Context(), e.plats[plat], b)
	if err != nil {
		e.t.Fatal(err)
	}
	return &agent{key: k, att: kbwire.Attestation{Nonce: n.Nonce, Evidence: ev}}
}

// releasedKey returns the HPKE key plat attested with for migration id that the keybroker
// released to (its record names the digest), as an agent's erasure evidence binds the key of
// the release it took part in; nil if none.
func (e *env) releasedKey(plat, id string) *seal.PrivateKey {
	e.t.Helper()
	vms, err := e.kb.recs.list(e.t.Context(), "guests/demo")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, vm := range vms {
		var g guestRecord
		if _, err := e.kb.recs.get(e.t.Context(), guestPath("demo", vm), &g); err != nil {
			e.t.Fatal(err)
		}
		if g.Migration == nil || g.Migration.ID != id {
			continue
		}
		for _, k := range e.keys[[2]string{plat, id}] {
			d := sha256.Sum256(k.PublicKey())
			if bytes.Equal(d[:], g.Migration.SourceKey) || bytes.Equal(d[:], g.Migration.DestinationKey) {
				return k
			}
		}
	}
	return nil
}

// abort returns the request of an abort of the released migration id of vm, with the
// destination's erasure evidence (the released destination platform, "destination").
func (e *env) abort(id, vm string) *kbwire.DestroyRequest {
	e.t.Helper()
	a := e.attest("destination", id, attest.RoleErased, keybrokertest.ErasureStatement(e.t, id))
	return &kbwire.DestroyRequest{MigrationID: id, Tenant: "demo", VM: vm, Ending: kbwire.Abort, Erasure: &a.att}
}

// adopt gives vm its first residency on the source platform and returns the response.
func (e *env) adopt(vm string) *kbwire.AdoptResponse {
	e.t.Helper()
	id := "adopt-" + vm
	a := e.attest("source", id, attest.RoleAdopt, keybrokertest.CleanStatement(e.t))
	resp, err := e.kb.Adopt(e.t.Context(), &kbwire.AdoptRequest{
		AdoptionID: id, Tenant: "demo", VM: vm, Policy: e.signedPolicy(1, nil), Agent: a.att,
	})
	if err != nil {
		e.t.Fatalf("adopting %s: %v", vm, err)
	}
	return resp
}

// migration is a release request with its two agents.
type migration struct {
	req      *kbwire.ReleaseRequest
	src, dst *agent
}

// newMigration attests both ends of migration id of vm (source platform "source",
// destination platform dstPlat) under the policy signed.
func (e *env) newMigration(id, vm, dstPlat string, signed []byte) *migration {
	e.t.Helper()
	src := e.attest("source", id, attest.RoleSource, nil)
	dst := e.attest(dstPlat, id, attest.RoleDestination, keybrokertest.CleanStatement(e.t))
	return &migration{
		req: &kbwire.ReleaseRequest{
			MigrationID: id, Tenant: "demo", VM: vm, Policy: signed,
			Source: src.att, Destination: dst.att, DestinationHost: kbwire.Host{Name: "host-b"}, SourceHost: "host-a",
		},
		src: src, dst: dst,
	}
}

// transitKeys lists the Transit keys, straight from Vault.
func (e *env) transitKeys() []string {
	e.t.Helper()
	s, err := e.admin.Logical().ListWithContext(e.t.Context(), "transit/keys")
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	if s != nil {
		for _, k := range s.Data["keys"].([]any) {
			out = append(out, k.(string))
		}
	}
	return out
}

// transitKeyExists reads a Transit key straight from Vault.
func (e *env) transitKeyExists(name string) bool {
	e.t.Helper()
	s, err := e.admin.Logical().ReadWithContext(e.t.Context(), "transit/keys/"+name)
	if err != nil {
		e.t.Fatal(err)
	}
	return s != nil
}

// guest reads a guest record straight from Vault.
func (e *env) guest(vm string) guestRecord {
	e.t.Helper()
	s, err := e.admin.KVv2(vaulttest.KVMount).Get(e.t.Context(), guestPath("demo", vm))
	if err != nil {
		e.t.Fatal(err)
	}
	b, _ := json.Marshal(s.Data)
	var g guestRecord
	if err := json.Unmarshal(b, &g); err != nil {
		e.t.Fatal(err)
	}
	return g
}
