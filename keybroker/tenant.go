package keybroker

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lethe-cc/lethe/internal/dsse"
	"github.com/lethe-cc/lethe/keybroker/kbwire"
	"github.com/lethe-cc/lethe/policy"
)

// The audit events of the tenant operations. Each, allowed or refused, is one event naming the
// tenant; a refusal carries its reason.
const (
	// EventTenantRegister: an admin registered a tenant (or was refused).
	EventTenantRegister EventKind = "tenant-register"
	// EventRotateKey: a tenant's policy key changed by a statement of its current key.
	EventRotateKey EventKind = "rotate-key"
	// EventRecoverKey: a tenant's policy key changed by a statement of its recovery key.
	EventRecoverKey EventKind = "recover-key"
	// EventPublishPolicy: a tenant published a policy; PolicySVN is the floor it asked for.
	EventPublishPolicy EventKind = "publish-policy"
)

// adminSkew is how far in the future an admin statement's IssuedAt may be (clock skew).
const adminSkew = time.Minute

// tenantRecord is a registered tenant, in KV at tenants/<tenant>.
type tenantRecord struct {
	PolicyKey []byte `json:"policyKey"`
	// RecoveryKey, if set, may sign a rotation in place of the policy key.
	RecoveryKey []byte `json:"recoveryKey,omitempty"`
	// RetiredKeys are the key IDs of the tenant's former policy keys: none comes back, so a
	// rotation statement (which names the key it replaces) is used at most once.
	RetiredKeys []string `json:"retiredKeys,omitempty"`
	// PolicySVN is a tenant-wide floor, from records written before floors were kept per
	// policy name; it applies to every policy of the tenant and nothing raises it any more.
	PolicySVN uint64 `json:"policySvn"`
	// Floors are the lowest policySvn accepted per policy name, raised only by PublishPolicy.
	Floors     map[string]uint64 `json:"floors,omitempty"`
	Registered time.Time         `json:"registered"`
	Rotated    time.Time         `json:"rotated,omitzero"`
}

// guestRecord is a guest's residency and its migration in progress, in KV at
// guests/<tenant>/<vm>. Every write is a check-and-set on the version read.
type guestRecord struct {
	// Epoch is the current residency epoch; WrappedMDK its MDK wrapped by the epoch key.
	Epoch      uint64 `json:"epoch"`
	WrappedMDK string `json:"wrappedMdk"`
	// Migration is the migration in progress, if any.
	Migration *migrationRecord `json:"migration,omitempty"`
	// LastMigration is the ID of the last migration that ended with a receipt.
	LastMigration string `json:"lastMigration,omitempty"`
	// Reissuing is the reissue that holds the live epoch while it logs its entry, until its
	// marker's Until (see reissueHold).
	Reissuing *reissueMarker `json:"reissuing,omitempty"`
}

// floorCache holds, per tenant, the policySvn floors loadTenant read last (merged upwards, as
// floors only rise), for tenantGate, which decides without I/O.
type floorCache struct {
	mu sync.Mutex
	m  map[string]map[string]uint64
}

// maxCachedTenants bounds the floor cache; past it the cache starts again (a request caught
// in between is refused, never allowed).
const maxCachedTenants = 1 << 16

func (c *floorCache) observe(tenant string, floors map[string]uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxCachedTenants {
		c.m = map[string]map[string]uint64{}
	}
	t := c.m[tenant]
	if t == nil {
		t = map[string]uint64{}
		c.m[tenant] = t
	}
	for name, f := range floors {
		t[name] = max(t[name], f)
	}
}

// get returns the floor of (tenant, name), and false if the tenant's floors were never loaded.
func (c *floorCache) get(tenant, name string) (uint64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.m[tenant]
	if !ok {
		return 0, false
	}
	return t[name], true
}

// RegisterTenant registers a tenant's policy-signing key (and optional recovery key). It is an
// admin call: req carries an AdminStatement for kbwire.OpTenantRegister signed with
// Config.AdminKey, unexpired, valid for at most kbwire.MaxAdminValidity, whose ID was never
// used. Registering a tenant again with the same keys does nothing; the admin can never change
// a registered tenant's key (only the tenant can: RotateKey). Every call is audited.
//
// It returns ErrUnauthorized (no admin key configured; a statement not signed by it, for
// another operation, expired, too long-lived or replayed; another key for a registered
// tenant), ErrInvalidRequest (a bad name or key, or a name that is another tenant's
// dash-prefix or extension, which would let key names collide), ErrGuestBusy (the tenant's
// record changed concurrently) or ErrVaultUnavailable.
func (k *Keybroker) RegisterTenant(ctx context.Context, req *kbwire.AdminRequest) (*kbwire.RegisterTenantResponse, error) {
	ev := Event{Kind: EventTenantRegister}
	resp, err := k.registerTenant(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("registering tenant: %w", err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) registerTenant(ctx context.Context, areq *kbwire.AdminRequest, ev *Event) (*kbwire.RegisterTenantResponse, error) {
	st, err := k.checkAdmin(ctx, areq.Signed, kbwire.OpTenantRegister)
	if err != nil {
		return nil, err
	}
	var req kbwire.RegisterTenantRequest
	if err := st.DecodeRequest(&req); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	ev.Tenant = req.Tenant
	if err := checkTenant(req.Tenant); err != nil {
		return nil, err
	}
	if len(req.PolicyKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("policy key is %d bytes, want %d: %w", len(req.PolicyKey), ed25519.PublicKeySize, ErrInvalidRequest)
	}
	if len(req.RecoveryKey) != 0 && len(req.RecoveryKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("recovery key is %d bytes, want %d: %w", len(req.RecoveryKey), ed25519.PublicKeySize, ErrInvalidRequest)
	}
	if bytes.Equal(req.PolicyKey, req.RecoveryKey) {
		return nil, fmt.Errorf("the recovery key is the policy key: %w", ErrInvalidRequest)
	}
	var rec tenantRecord
	ver, err := k.recs.get(ctx, tenantPath(req.Tenant), &rec)
	if err != nil {
		return nil, err
	}
	if ver != 0 {
		if bytes.Equal(rec.PolicyKey, req.PolicyKey) && (len(req.RecoveryKey) == 0 || bytes.Equal(rec.RecoveryKey, req.RecoveryKey)) {
			return registered(req.Tenant, &rec), nil
		}
		return nil, fmt.Errorf("%s is registered with other keys, and only the tenant changes its key (a rotation signed by its current or recovery key): %w", req.Tenant, ErrUnauthorized)
	}
	names, err := k.recs.list(ctx, "tenants")
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		if strings.HasPrefix(n, req.Tenant+"-") || strings.HasPrefix(req.Tenant, n+"-") {
			return nil, fmt.Errorf("%s and the registered %s would share key names: %w", req.Tenant, n, ErrInvalidRequest)
		}
	}
	rec = tenantRecord{PolicyKey: req.PolicyKey, RecoveryKey: req.RecoveryKey, Registered: k.now().UTC()}
	if _, err := k.recs.put(ctx, tenantPath(req.Tenant), &rec, 0); err != nil {
		if errors.Is(err, errConflict) {
			return nil, fmt.Errorf("%s: %w", req.Tenant, ErrGuestBusy)
		}
		return nil, err
	}
	k.log.InfoContext(ctx, "Tenant registered", attrTenant, req.Tenant)
	return registered(req.Tenant, &rec), nil
}

func registered(tenant string, rec *tenantRecord) *kbwire.RegisterTenantResponse {
	return &kbwire.RegisterTenantResponse{Tenant: tenant, PolicySVN: rec.PolicySVN, KeyID: dsse.KeyID(rec.PolicyKey), Recovery: len(rec.RecoveryKey) > 0}
}

// adminRequestRecord marks an admin statement's ID spent, in KV at admin-requests/<digest>.
type adminRequestRecord struct {
	Op      string    `json:"op"`
	Expires time.Time `json:"expires"`
}

// checkAdmin verifies an admin statement for op (verifyAdmin), then spends the statement's
// ID (spendStatement). It returns ErrUnauthorized or ErrVaultUnavailable.
func (k *Keybroker) checkAdmin(ctx context.Context, signed []byte, op string) (*kbwire.AdminStatement, error) {
	st, err := k.verifyAdmin(signed, op)
	if err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	if err := k.spendStatement(ctx, st); err != nil {
		return nil, err
	}
	return st, nil
}

// verifyAdmin verifies an admin statement for op: signed with Config.AdminKey, and current
// (checkStatement). It spends nothing. It returns ErrUnauthorized.
func (k *Keybroker) verifyAdmin(signed []byte, op string) (*kbwire.AdminStatement, error) {
	if len(k.cfg.AdminKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("no admin key configured: %w", ErrUnauthorized)
	}
	st, err := kbwire.OpenAdmin(signed, k.cfg.AdminKey)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnauthorized, err)
	}
	if err := k.checkStatement(st, op); err != nil {
		return nil, err
	}
	return st, nil
}

// checkStatement checks a verified admin or tenant statement: for op, issued no later than a
// minute from now, unexpired, valid for at most kbwire.MaxAdminValidity. It returns
// ErrUnauthorized.
func (k *Keybroker) checkStatement(st *kbwire.AdminStatement, op string) error {
	now := k.now()
	switch {
	case st.Op != op:
		return fmt.Errorf("statement for %q, not %q: %w", st.Op, op, ErrUnauthorized)
	case st.Expires.Sub(st.IssuedAt) > kbwire.MaxAdminValidity || !st.Expires.After(st.IssuedAt):
		return fmt.Errorf("statement valid from %v to %v, longer than %v: %w", st.IssuedAt, st.Expires, kbwire.MaxAdminValidity, ErrUnauthorized)
	case st.IssuedAt.After(now.Add(adminSkew)):
		return fmt.Errorf("statement issued in the future (%v): %w", st.IssuedAt, ErrUnauthorized)
	case !now.Before(st.Expires):
		return fmt.Errorf("statement expired at %v: %w", st.Expires, ErrUnauthorized)
	}
	return nil
}

// spendStatement spends a verified statement's ID: a create-only record in Vault, which one
// call wins, so that a statement is used at most once (admin and tenant statements share the
// records: their IDs are 128 random bits). It returns ErrUnauthorized for an ID already spent,
// or ErrVaultUnavailable.
func (k *Keybroker) spendStatement(ctx context.Context, st *kbwire.AdminStatement) error {
	d := sha256.Sum256([]byte(st.ID))
	if _, err := k.recs.put(ctx, "admin-requests/"+hex.EncodeToString(d[:]), &adminRequestRecord{Op: st.Op, Expires: st.Expires}, 0); err != nil {
		if errors.Is(err, errConflict) {
			return fmt.Errorf("statement %s already used: %w", st.ID, ErrUnauthorized)
		}
		return err
	}
	return nil
}

// RotateKey replaces a tenant's policy key by the one a KeyRotation names. The statement must
// name the tenant's current key (CurrentKeyID) and be signed by it or, when that key is lost,
// by the tenant's recovery key (audited as EventRecoverKey). The new key must never have been
// the tenant's (nor be its recovery key). Only a statement of the recovery key may replace the
// recovery key; one of the policy key may add one where there is none. Floors are kept. Every
// call is audited.
//
// It returns ErrInvalidRequest (a malformed statement or name, a new key already used),
// ErrUnknownTenant, ErrUnauthorized (a statement naming another key than the current one, or
// signed by neither the current nor the recovery key, or replacing the recovery key without
// it), ErrGuestBusy (the record changed concurrently) or ErrVaultUnavailable.
func (k *Keybroker) RotateKey(ctx context.Context, req *kbwire.RotateKeyRequest) (*kbwire.RotateKeyResponse, error) {
	ev := Event{Kind: EventRotateKey}
	resp, err := k.rotateKey(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("rotating tenant key: %w", err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) rotateKey(ctx context.Context, req *kbwire.RotateKeyRequest, ev *Event) (*kbwire.RotateKeyResponse, error) {
	env, r, err := kbwire.ParseRotation(req.Signed)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	ev.Tenant = r.Tenant
	if err := checkTenant(r.Tenant); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	rec, ver, err := k.loadTenant(ctx, r.Tenant)
	if err != nil {
		return nil, err
	}
	current := dsse.KeyID(rec.PolicyKey)
	if r.CurrentKeyID != current {
		return nil, fmt.Errorf("the rotation replaces key %s, but %s's key is %s: %w", r.CurrentKeyID, r.Tenant, current, ErrUnauthorized)
	}
	byRecovery := false
	if _, err := env.Verify(kbwire.RotationPayloadType, rec.PolicyKey); err != nil {
		if len(rec.RecoveryKey) == 0 {
			return nil, fmt.Errorf("the rotation is not signed by %s's current key %s: %w", r.Tenant, current, ErrUnauthorized)
		}
		if _, err := env.Verify(kbwire.RotationPayloadType, rec.RecoveryKey); err != nil {
			return nil, fmt.Errorf("the rotation is signed by neither %s's current key %s nor its recovery key: %w", r.Tenant, current, ErrUnauthorized)
		}
		byRecovery = true
		ev.Kind = EventRecoverKey
	}
	newID := dsse.KeyID(r.NewKey)
	switch {
	case newID == current || slices.Contains(rec.RetiredKeys, newID):
		return nil, fmt.Errorf("key %s was %s's already; a rotation needs a new key: %w", newID, r.Tenant, ErrInvalidRequest)
	case bytes.Equal(r.NewKey, rec.RecoveryKey) || bytes.Equal(r.NewKey, r.NewRecoveryKey):
		return nil, fmt.Errorf("the new policy key is a recovery key: %w", ErrInvalidRequest)
	case len(r.NewRecoveryKey) > 0 && len(rec.RecoveryKey) > 0 && !byRecovery:
		return nil, fmt.Errorf("only %s's recovery key may replace its recovery key: %w", r.Tenant, ErrUnauthorized)
	}
	next := *rec
	next.RetiredKeys = append(slices.Clone(rec.RetiredKeys), current)
	next.PolicyKey = r.NewKey
	if len(r.NewRecoveryKey) > 0 {
		next.RecoveryKey = r.NewRecoveryKey
	}
	next.Rotated = k.now().UTC()
	if _, err := k.recs.put(ctx, tenantPath(r.Tenant), &next, ver); err != nil {
		if errors.Is(err, errConflict) {
			return nil, fmt.Errorf("%s: %w", r.Tenant, ErrGuestBusy)
		}
		return nil, err
	}
	k.log.InfoContext(ctx, "Tenant key rotated", attrTenant, r.Tenant, "key", newID, "by_recovery_key", byRecovery)
	return &kbwire.RotateKeyResponse{Tenant: r.Tenant, KeyID: newID, Recovery: byRecovery}, nil
}

// PublishPolicy raises the floor of a policy's (tenant, name) to its policySvn: from then on the
// keybroker refuses, for every guest, a policy of that name with a lower policySvn, whatever
// the broker keeps. The tenant is the policy's metadata.tenant, and the envelope must verify
// with its registered key. Publishing the floor's own policySvn again changes nothing. Every
// call is audited.
//
// It returns ErrInvalidRequest (an envelope or policy that does not decode), ErrUnknownTenant,
// ErrPolicyRejected (a bad signature, or a policySvn below the floor, which also matches
// policy.ErrRollback), ErrGuestBusy (the record kept changing) or ErrVaultUnavailable.
func (k *Keybroker) PublishPolicy(ctx context.Context, req *kbwire.PublishPolicyRequest) (*kbwire.PublishPolicyResponse, error) {
	ev := Event{Kind: EventPublishPolicy}
	resp, err := k.publishPolicy(ctx, req, &ev)
	if err != nil {
		err = fmt.Errorf("publishing policy: %w", err)
	}
	k.emit(ctx, &ev, err)
	return resp, err
}

func (k *Keybroker) publishPolicy(ctx context.Context, req *kbwire.PublishPolicyRequest, ev *Event) (*kbwire.PublishPolicyResponse, error) {
	env, err := policy.ParseEnvelope(req.Policy)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	// The tenant named inside picks the key; nothing of the payload counts before it verifies.
	claimed, err := policy.Parse("published policy", env.Payload)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	tenant := claimed.Metadata.Tenant
	ev.Tenant = tenant
	if err := checkTenant(tenant); err != nil {
		return nil, err
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, err
	}
	for range 3 {
		rec, ver, err := k.loadTenant(ctx, tenant)
		if err != nil {
			return nil, err
		}
		p, err := env.Verify(rec.PolicyKey)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrPolicyRejected, err)
		}
		d := p.Digest()
		name, svn := p.Metadata.Name, p.Metadata.PolicySVN
		ev.PolicyDigest, ev.PolicySVN = d[:], svn
		floor := max(rec.PolicySVN, rec.Floors[name])
		if err := policy.CheckRollback(p, floor); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrPolicyRejected, err)
		}
		if svn == rec.Floors[name] {
			return &kbwire.PublishPolicyResponse{Tenant: tenant, Name: name, Floor: floor}, nil
		}
		next := *rec
		next.Floors = make(map[string]uint64, len(rec.Floors)+1)
		for n, f := range rec.Floors {
			next.Floors[n] = f
		}
		next.Floors[name] = svn
		_, err = k.recs.put(ctx, tenantPath(tenant), &next, ver)
		if err == nil {
			k.floors.observe(tenant, next.Floors)
			k.log.InfoContext(ctx, "Policy floor raised", attrTenant, tenant, "policy", name, attrPolicySVN, svn)
			return &kbwire.PublishPolicyResponse{Tenant: tenant, Name: name, Floor: svn}, nil
		}
		if !errors.Is(err, errConflict) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%s: %w", tenant, ErrGuestBusy)
}

// loadTenant returns the tenant's record and version, or ErrUnknownTenant, and records its
// floors for tenantGate.
func (k *Keybroker) loadTenant(ctx context.Context, tenant string) (*tenantRecord, int, error) {
	var rec tenantRecord
	ver, err := k.recs.get(ctx, tenantPath(tenant), &rec)
	if err != nil {
		return nil, 0, err
	}
	if ver == 0 || len(rec.PolicyKey) != ed25519.PublicKeySize {
		return nil, 0, fmt.Errorf("%s: %w", tenant, ErrUnknownTenant)
	}
	k.floors.observe(tenant, rec.Floors)
	return &rec, ver, nil
}

// acceptSVN refuses a policySvn below the tenant-wide floor of older records. It raises
// nothing: floors rise only when the tenant publishes (PublishPolicy), never because a release
// carried a newer policy, and tenantGate has checked the floor of the policy's name.
func (k *Keybroker) acceptSVN(_ context.Context, _ string, rec *tenantRecord, _ int, svn uint64) error {
	if svn < rec.PolicySVN {
		return fmt.Errorf("%w: policySvn %d is below the tenant's floor %d", ErrPolicyRejected, svn, rec.PolicySVN)
	}
	return nil
}
