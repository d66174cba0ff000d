package keybroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// ensureAuth logs in with AppRole when there is no token yet.
func (k *Keybroker) ensureAuth(ctx context.Context) error {
	if k.cfg.AppRole == nil {
		return nil
	}
	k.authMu.Lock()
	defer k.authMu.Unlock()
	if k.vault.Token() != "" {
		return nil
	}
	_, err := k.loginLocked(ctx)
	return err
}

// loginLocked logs in with AppRole, sets the client's token and returns its TTL.
func (k *Keybroker) loginLocked(ctx context.Context) (time.Duration, error) {
	ar := k.cfg.AppRole
	mount := ar.Mount
	if mount == "" {
		mount = "approle"
	}
	// The login itself must not carry a stale token.
	k.vault.ClearToken()
	s, err := k.vault.Logical().WriteWithContext(ctx, "auth/"+mount+"/login", map[string]any{
		"role_id":   ar.RoleID,
		"secret_id": ar.SecretID,
	})
	if err != nil {
		return 0, fmt.Errorf("logging in to Vault with AppRole: %w", countVault(k.cfg.Metrics, err))
	}
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		return 0, errors.New("logging in to Vault with AppRole: no token in the response")
	}
	k.vault.SetToken(s.Auth.ClientToken)
	k.log.InfoContext(ctx, "Logged in to Vault with AppRole")
	return time.Duration(s.Auth.LeaseDuration) * time.Second, nil
}

// renewLoop keeps the token alive: it renews it at two thirds of its TTL and, with AppRole,
// logs in again when renewal fails or the token reaches its maximum TTL. A non-renewable
// token without AppRole is left to expire (logged).
func (k *Keybroker) renewLoop(ctx context.Context) {
	backoff := time.Second
	for {
		ttl, renewable, err := k.tokenTTL(ctx)
		if err == nil && !renewable && k.cfg.AppRole == nil {
			if ttl > 0 {
				k.log.WarnContext(ctx, "Vault token is not renewable and will expire", attrTTL, ttl.String())
			}
			return
		}
		wait := ttl * 2 / 3
		if err != nil {
			k.log.WarnContext(ctx, "Looking up the Vault token failed", attrError, err.Error())
			wait, backoff = backoff, min(backoff*2, time.Minute)
		} else {
			backoff = time.Second
		}
		if ttl == 0 && err == nil {
			return // a root token: nothing to renew
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := k.renew(ctx, renewable); err != nil {
			k.log.WarnContext(ctx, "Renewing the Vault token failed", attrError, err.Error())
		}
	}
}

// tokenTTL looks the current token up.
func (k *Keybroker) tokenTTL(ctx context.Context) (time.Duration, bool, error) {
	if err := k.ensureAuth(ctx); err != nil {
		return 0, false, err
	}
	s, err := k.vault.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		return 0, false, fmt.Errorf("looking up the Vault token: %w", countVault(k.cfg.Metrics, err))
	}
	if s == nil || s.Data == nil {
		return 0, false, errors.New("looking up the Vault token: empty response")
	}
	var ttl int64
	if n, ok := s.Data["ttl"].(json.Number); ok {
		ttl, _ = n.Int64()
	}
	renewable, _ := s.Data["renewable"].(bool)
	return time.Duration(ttl) * time.Second, renewable, nil
}

// renew renews the token, or logs in again with AppRole.
func (k *Keybroker) renew(ctx context.Context, renewable bool) error {
	if renewable {
		s, err := k.vault.Auth().Token().RenewSelfWithContext(ctx, 0)
		if err == nil && s != nil && s.Auth != nil && s.Auth.LeaseDuration > 0 {
			return nil
		}
		if k.cfg.AppRole == nil {
			if err == nil {
				err = errors.New("no lease in the response")
			}
			return fmt.Errorf("renewing the Vault token: %w", countVault(k.cfg.Metrics, err))
		}
	}
	if k.cfg.AppRole == nil {
		return nil
	}
	k.authMu.Lock()
	defer k.authMu.Unlock()
	_, err := k.loginLocked(ctx)
	return err
}
