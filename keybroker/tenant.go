package keybroker

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"strings"
	"time"
)

// tenantRecord is a registered tenant, in KV at tenants/<tenant>.
type tenantRecord struct {
	PolicyKey  []byte    `json:"policyKey"`
	PolicySVN  uint64    `json:"policySvn"`
	Registered time.Time `json:"registered"`
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
}

// RegisterTenant registers (or, with Replace, re-keys) a tenant's policy-signing key. It is
// an admin call: adminToken must be Config.AdminToken, or, without one, the token whose digest
// a running keybroker published (see Config.AdminToken). It returns ErrUnauthorized,
// ErrInvalidRequest (a bad name or key, or a name that is another tenant's dash-prefix or
// extension, which would let key names collide), ErrGuestBusy (the tenant's record changed
// concurrently) or ErrVaultUnavailable.
func (k *Keybroker) RegisterTenant(ctx context.Context, adminToken string, req RegisterTenantRequest) (*RegisterTenantResponse, error) {
	if err := k.checkAdmin(ctx, adminToken); err != nil {
		return nil, fmt.Errorf("registering tenant: %w", err)
	}
	if err := checkTenant(req.Tenant); err != nil {
		return nil, fmt.Errorf("registering tenant: %w", err)
	}
	if len(req.PolicyKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("registering tenant: policy key is %d bytes, want %d: %w", len(req.PolicyKey), ed25519.PublicKeySize, ErrInvalidRequest)
	}
	if err := k.ensureAuth(ctx); err != nil {
		return nil, fmt.Errorf("registering tenant: %w", err)
	}
	var rec tenantRecord
	ver, err := k.recs.get(ctx, tenantPath(req.Tenant), &rec)
	if err != nil {
		return nil, fmt.Errorf("registering tenant: %w", err)
	}
	if ver != 0 && !req.Replace {
		if string(rec.PolicyKey) == string(req.PolicyKey) {
			return &RegisterTenantResponse{Tenant: req.Tenant, PolicySVN: rec.PolicySVN}, nil
		}
		return nil, fmt.Errorf("registering tenant: %s is registered with another key (use replace): %w", req.Tenant, ErrInvalidRequest)
	}
	if ver == 0 {
		names, err := k.recs.list(ctx, "tenants")
		if err != nil {
			return nil, fmt.Errorf("registering tenant: %w", err)
		}
		for _, n := range names {
			if strings.HasPrefix(n, req.Tenant+"-") || strings.HasPrefix(req.Tenant, n+"-") {
				return nil, fmt.Errorf("registering tenant: %s and the registered %s would share key names: %w", req.Tenant, n, ErrInvalidRequest)
			}
		}
	}
	rec.PolicyKey = req.PolicyKey
	rec.Registered = k.now().UTC()
	if _, err := k.recs.put(ctx, tenantPath(req.Tenant), &rec, ver); err != nil {
		if errors.Is(err, errConflict) {
			return nil, fmt.Errorf("registering tenant: %w", ErrGuestBusy)
		}
		return nil, fmt.Errorf("registering tenant: %w", err)
	}
	k.log.InfoContext(ctx, "Tenant registered", attrTenant, req.Tenant)
	return &RegisterTenantResponse{Tenant: req.Tenant, PolicySVN: rec.PolicySVN}, nil
}

// loadTenant returns the tenant's record and version, or ErrUnknownTenant.
func (k *Keybroker) loadTenant(ctx context.Context, tenant string) (*tenantRecord, int, error) {
	var rec tenantRecord
	ver, err := k.recs.get(ctx, tenantPath(tenant), &rec)
	if err != nil {
		return nil, 0, err
	}
	if ver == 0 || len(rec.PolicyKey) != ed25519.PublicKeySize {
		return nil, 0, fmt.Errorf("%s: %w", tenant, ErrUnknownTenant)
	}
	return &rec, ver, nil
}

// acceptSVN raises the tenant's last accepted policySvn to svn, refusing a rollback that
// happened concurrently.
func (k *Keybroker) acceptSVN(ctx context.Context, tenant string, rec *tenantRecord, ver int, svn uint64) error {
	for range 3 {
		if svn < rec.PolicySVN {
			return fmt.Errorf("policySvn %d is below the %d accepted last: %w", svn, rec.PolicySVN, ErrPolicyRejected)
		}
		if svn == rec.PolicySVN {
			return nil
		}
		next := *rec
		next.PolicySVN = svn
		_, err := k.recs.put(ctx, tenantPath(tenant), &next, ver)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errConflict) {
			return err
		}
		if rec, ver, err = k.loadTenant(ctx, tenant); err != nil {
			return err
		}
	}
	return fmt.Errorf("recording policySvn: %w", ErrGuestBusy)
}
