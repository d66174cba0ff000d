package kbwire

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/lethe-cc/lethe/internal/dsse"
)

// The signed statements of the keybroker's admin and tenant operations. All are DSSE
// envelopes (package dsse) whose payload is the statement's JSON; no bearer secret travels.
const (
	// AdminPayloadType is the DSSE payload type of an AdminStatement.
	AdminPayloadType = "application/vnd.lethe.admin-request+json"
	// TenantPayloadType is the DSSE payload type of a TenantStatement.
	TenantPayloadType = "application/vnd.lethe.tenant-request+json"
	// RotationPayloadType is the DSSE payload type of a KeyRotation.
	RotationPayloadType = "application/vnd.lethe.key-rotation+json"
	// MaxAdminValidity is the longest an AdminStatement or a TenantStatement may be valid
	// (Expires − IssuedAt).
	MaxAdminValidity = 5 * time.Minute
	// maxStatement bounds a signed statement's size.
	maxStatement = 64 << 10
)

// AdminStatement is an operator's admin call, signed with the admin key. The keybroker accepts
// it once (ID is spent), only before Expires, and only for the operation it names.
type AdminStatement struct {
	// Op is the operation (OpTenantRegister).
	Op string `json:"op"`
	// ID is unique per statement (SignAdmin draws 128 random bits); the keybroker spends it.
	ID string `json:"id"`
	// IssuedAt and Expires bound the statement's validity, at most MaxAdminValidity apart.
	IssuedAt time.Time `json:"issuedAt"`
	Expires  time.Time `json:"expires"`
	// Request is the operation's request (a RegisterTenantRequest for OpTenantRegister).
	Request json.RawMessage `json:"request"`
}

// TenantStatement is a tenant's call, signed with its policy key: the same statement as an
// admin's, under TenantPayloadType, accepted once, only before Expires, and only for the
// operation it names and the tenant its Request names.
type TenantStatement = AdminStatement

// KeyRotation is a tenant's statement that its policy key changes: signed by the current
// policy key, or, when that key is lost, by the recovery key registered with the tenant.
type KeyRotation struct {
	Tenant string `json:"tenant"`
	// CurrentKeyID names the policy key being replaced (dsse.KeyID): a statement applies only
	// while that key is the tenant's, and a retired key never comes back, so each statement
	// is used at most once.
	CurrentKeyID string `json:"currentKeyId"`
	// NewKey is the new policy key (Ed25519, 32 bytes).
	NewKey []byte `json:"newKey"`
	// NewRecoveryKey, if set, replaces the recovery key (32 bytes). Only a statement signed by
	// the recovery key may replace one; the current policy key may only add one to a tenant
	// that has none.
	NewRecoveryKey []byte `json:"newRecoveryKey,omitempty"`
	// IssuedAt is when the statement was made (informative, audited).
	IssuedAt time.Time `json:"issuedAt"`
}

// ErrStatement is returned (wrapped) by OpenAdmin and ParseRotation for a statement that does
// not decode or has the wrong shape.
var ErrStatement = errors.New("malformed signed statement")

// SignAdmin returns the envelope of an AdminStatement for op and req, issued at now and valid
// for validity (at most MaxAdminValidity), with a random ID, signed with key.
func SignAdmin(op string, req any, now time.Time, validity time.Duration, key ed25519.PrivateKey) ([]byte, error) {
	return signRequest(AdminPayloadType, op, req, now, validity, key)
}

// SignTenant returns the envelope of a TenantStatement for op and req, issued at now and valid
// for validity (at most MaxAdminValidity), with a random ID, signed with key (the tenant's
// policy key).
func SignTenant(op string, req any, now time.Time, validity time.Duration, key ed25519.PrivateKey) ([]byte, error) {
	return signRequest(TenantPayloadType, op, req, now, validity, key)
}

func signRequest(payloadType, op string, req any, now time.Time, validity time.Duration, key ed25519.PrivateKey) ([]byte, error) {
	if validity <= 0 || validity > MaxAdminValidity {
		return nil, fmt.Errorf("signing %s request: validity %v, want up to %v", op, validity, MaxAdminValidity)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("signing %s request: %w", op, err)
	}
	st := AdminStatement{Op: op, ID: randomID(), IssuedAt: now.UTC(), Expires: now.UTC().Add(validity), Request: body}
	return signStatement(payloadType, &st, key)
}

// OpenAdmin verifies an admin envelope with the admin public key and decodes its statement.
// It checks the signature and the shape only; the keybroker checks op, time and ID. It returns
// an error wrapping dsse.ErrSignature or ErrStatement.
func OpenAdmin(signed []byte, pub ed25519.PublicKey) (*AdminStatement, error) {
	env, err := dsse.Parse(signed, maxStatement)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStatement, err)
	}
	payload, err := env.Verify(AdminPayloadType, pub)
	if err != nil {
		return nil, fmt.Errorf("verifying admin request: %w", err)
	}
	return decodeRequest(payload)
}

// StatementType returns the payload type of a signed statement's envelope, unverified: which
// key it must be verified with (AdminPayloadType: the admin key; TenantPayloadType: the
// tenant's). It returns an error wrapping ErrStatement.
func StatementType(signed []byte) (string, error) {
	env, err := dsse.Parse(signed, maxStatement)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrStatement, err)
	}
	return env.PayloadType, nil
}

// ParseTenant decodes a TenantStatement's envelope and statement without verifying any
// signature: the keybroker verifies the envelope (PayloadType TenantPayloadType) with the key
// of the tenant the statement's Request names. It returns an error wrapping ErrStatement.
func ParseTenant(signed []byte) (*dsse.Envelope, *TenantStatement, error) {
	env, err := dsse.Parse(signed, maxStatement)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrStatement, err)
	}
	if env.PayloadType != TenantPayloadType {
		return nil, nil, fmt.Errorf("%w: payload type %q, want %q", ErrStatement, env.PayloadType, TenantPayloadType)
	}
	st, err := decodeRequest(env.Payload)
	if err != nil {
		return nil, nil, err
	}
	return env, st, nil
}

// decodeRequest decodes an admin or tenant statement and checks its shape.
func decodeRequest(payload []byte) (*AdminStatement, error) {
	var st AdminStatement
	if err := decodeStrict(payload, &st); err != nil {
		return nil, err
	}
	if st.Op == "" || st.ID == "" || len(st.ID) > 128 || st.IssuedAt.IsZero() || st.Expires.IsZero() || len(st.Request) == 0 {
		return nil, fmt.Errorf("%w: statement without op, id, times or request", ErrStatement)
	}
	return &st, nil
}

// DecodeRequest decodes the statement's Request strictly into v.
func (st *AdminStatement) DecodeRequest(v any) error { return decodeStrict(st.Request, v) }

// SignRotation returns the envelope of r signed with key (the current policy key, or the
// recovery key).
func SignRotation(r *KeyRotation, key ed25519.PrivateKey) ([]byte, error) {
	return signStatement(RotationPayloadType, r, key)
}

// ParseRotation decodes a rotation envelope and its statement without verifying any
// signature: the keybroker verifies it with the key the statement must come from
// (VerifyRotation). It returns an error wrapping ErrStatement.
func ParseRotation(signed []byte) (*dsse.Envelope, *KeyRotation, error) {
	env, err := dsse.Parse(signed, maxStatement)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrStatement, err)
	}
	if env.PayloadType != RotationPayloadType {
		return nil, nil, fmt.Errorf("%w: payload type %q, want %q", ErrStatement, env.PayloadType, RotationPayloadType)
	}
	var r KeyRotation
	if err := decodeStrict(env.Payload, &r); err != nil {
		return nil, nil, err
	}
	if r.Tenant == "" || r.CurrentKeyID == "" || len(r.NewKey) != ed25519.PublicKeySize ||
		len(r.NewRecoveryKey) != 0 && len(r.NewRecoveryKey) != ed25519.PublicKeySize {
		return nil, nil, fmt.Errorf("%w: rotation without tenant or current key ID, or with a key that is not 32 bytes", ErrStatement)
	}
	return env, &r, nil
}

func signStatement(payloadType string, v any, key ed25519.PrivateKey) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("signing statement: private key is %d bytes, want %d", len(key), ed25519.PrivateKeySize)
	}
	payload, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("signing statement: %w", err)
	}
	env, err := dsse.Sign(payloadType, payload, key.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) {
		return ed25519.Sign(key, msg), nil
	})
	if err != nil {
		return nil, fmt.Errorf("signing statement: %w", err)
	}
	return json.Marshal(env)
}

// decodeStrict decodes one JSON value with no unknown field and nothing after it.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %w", ErrStatement, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: data after the statement", ErrStatement)
	}
	return nil
}

// randomID returns 128 random bits as text.
func randomID() string { return rand.Text() }
