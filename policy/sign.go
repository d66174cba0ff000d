package policy

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/lethe-cc/lethe/internal/dsse"
)

// PayloadType is the DSSE payload type of a signed policy.
const PayloadType = "application/vnd.lethe.policy+yaml"

// The file names keygen writes.
const (
	PrivateKeyFile = "tenant.key"
	PublicKeyFile  = "tenant.pub"
)

// Errors of envelopes and signatures.
var (
	// ErrSignature is returned by Verify when no signature of the envelope verifies with the
	// given key.
	ErrSignature = errors.New("no valid signature from the tenant's key")
	// ErrRollback is returned by CheckRollback for a policySvn lower than the last accepted.
	ErrRollback = errors.New("policy rollback")
)

// Envelope is a signed policy: a DSSE envelope (package dsse) whose payload is the exact YAML
// bytes of the policy and whose signatures are Ed25519 signatures over the payload's
// pre-authentication encoding (PAE). It encodes as DSSE's JSON and decodes strictly wherever
// it is decoded (see package dsse).
type Envelope dsse.Envelope

// Signature is one signature of an envelope.
type Signature = dsse.Signature

// UnmarshalJSON decodes an envelope strictly, as ParseEnvelope does but without its checks of
// size and payload type; see dsse.Envelope.UnmarshalJSON. Errors wrap dsse.ErrMalformed.
func (env *Envelope) UnmarshalJSON(b []byte) error {
	return (*dsse.Envelope)(env).UnmarshalJSON(b)
}

// KeyID names a public key: "sha256:" and the hex SHA-256 of its PKIX encoding (dsse.KeyID).
func KeyID(pub ed25519.PublicKey) string { return dsse.KeyID(pub) }

// Sign parses policyYAML (refusing to sign a policy that does not parse) and returns it in an
// envelope signed with key.
func Sign(file string, policyYAML []byte, key ed25519.PrivateKey) (*Envelope, error) {
	if _, err := Parse(file, policyYAML); err != nil {
		return nil, fmt.Errorf("signing policy: %w", err)
	}
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("signing policy: private key is %d bytes, want %d", len(key), ed25519.PrivateKeySize)
	}
	env, err := dsse.Sign(PayloadType, policyYAML, key.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) {
		return ed25519.Sign(key, msg), nil
	})
	if err != nil {
		return nil, fmt.Errorf("signing policy: %w", err)
	}
	return (*Envelope)(env), nil
}

// Marshal encodes the envelope as JSON.
func (env *Envelope) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(env, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding envelope: %w", err)
	}
	return append(b, '\n'), nil
}

// ParseEnvelope decodes an envelope of at most 2*MaxSize bytes strictly (see package dsse:
// unknown members are ignored, names must match exactly, base64 standard or URL-safe). It
// checks shape only (payload type, payload size, 1 to dsse.MaxSignatures signatures); it
// proves nothing. Errors for malformed JSON wrap dsse.ErrMalformed.
func ParseEnvelope(b []byte) (*Envelope, error) {
	env, err := dsse.Parse(b, 2*MaxSize)
	if err != nil {
		return nil, fmt.Errorf("decoding envelope: %w", err)
	}
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("decoding envelope: payload type %q, want %q", env.PayloadType, PayloadType)
	}
	if len(env.Payload) > MaxSize {
		return nil, fmt.Errorf("decoding envelope: payload of %d bytes exceeds the %d-byte limit", len(env.Payload), MaxSize)
	}
	return (*Envelope)(env), nil
}

// Verify decodes a signed policy, checks that a signature over it verifies with pub, and
// parses the payload. It returns ErrSignature (errors.Is) when no signature verifies, and
// *ParseErrors for a signed payload that does not parse. It does not check rollback: see
// CheckRollback.
func Verify(signed []byte, pub ed25519.PublicKey) (*Policy, error) {
	env, err := ParseEnvelope(signed)
	if err != nil {
		return nil, fmt.Errorf("verifying policy: %w", err)
	}
	return env.Verify(pub)
}

// Verify checks that a signature of env verifies with pub and parses the payload; see the
// function Verify.
func (env *Envelope) Verify(pub ed25519.PublicKey) (*Policy, error) {
	payload, err := (*dsse.Envelope)(env).Verify(PayloadType, pub)
	switch {
	case errors.Is(err, dsse.ErrSignature):
		return nil, fmt.Errorf("verifying policy: %w (key %s)", ErrSignature, KeyID(pub))
	case err != nil:
		return nil, fmt.Errorf("verifying policy: %w", err)
	}
	p, err := Parse("signed policy", payload)
	if err != nil {
		return nil, fmt.Errorf("verifying policy: %w", err)
	}
	return p, nil
}

// CheckRollback returns an error matching ErrRollback if p's policySvn is lower than
// lastAccepted, the floor of p's (tenant, name): the highest policySvn the tenant published. The
// same policySvn is accepted again.
func CheckRollback(p *Policy, lastAccepted uint64) error {
	if p.Metadata.PolicySVN < lastAccepted {
		return fmt.Errorf("%w: policySvn %d of tenant %s is lower than %d, the last accepted", ErrRollback, p.Metadata.PolicySVN, p.Metadata.Tenant, lastAccepted)
	}
	return nil
}

// PEM block types of tenant keys.
const (
	pemPrivate = "PRIVATE KEY"
	pemPublic  = "PUBLIC KEY"
)

// GenerateKey writes a new Ed25519 key pair into dir: PrivateKeyFile (PKCS #8 PEM, mode
// 0600) and PublicKeyFile (PKIX PEM). It refuses to overwrite an existing key file.
func GenerateKey(dir string) (ed25519.PublicKey, error) {
	return GenerateKeyNamed(dir, "tenant")
}

// GenerateKeyNamed writes a new Ed25519 key pair into dir as name.key (PKCS #8 PEM, mode 0600)
// and name.pub (PKIX PEM): a tenant's key is "tenant", its recovery key "recovery", the
// keybroker's admin key "admin". It refuses to overwrite an existing key file.
func GenerateKeyNamed(dir, name string) (ed25519.PublicKey, error) {
	if name == "" || strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
		return nil, fmt.Errorf("generating key: bad key name %q", name)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating key: %w", err)
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encoding private key: %w", err)
	}
	pubPEM, err := MarshalPublicKey(pub)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("writing key pair: %w", err)
	}
	if err := writeNew(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: pemPrivate, Bytes: privDER}), 0o600); err != nil {
		return nil, err
	}
	if err := writeNew(filepath.Join(dir, name+".pub"), pubPEM, 0o644); err != nil {
		return nil, err
	}
	return pub, nil
}

func writeNew(path string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("writing key file: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing key file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing key file: %w", err)
	}
	return nil
}

// MarshalPublicKey encodes pub as PKIX PEM.
func MarshalPublicKey(pub ed25519.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encoding public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemPublic, Bytes: der}), nil
}

// ParsePublicKey decodes a PKIX PEM Ed25519 public key.
func ParsePublicKey(b []byte) (ed25519.PublicKey, error) {
	block, _ := pem.Decode(b)
	if block == nil || block.Type != pemPublic {
		return nil, fmt.Errorf("decoding public key: no %q PEM block", pemPublic)
	}
	k, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("decoding public key: %w", err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("decoding public key: %T is not an Ed25519 key", k)
	}
	return pub, nil
}

// ParsePrivateKey decodes a PKCS #8 PEM Ed25519 private key.
func ParsePrivateKey(b []byte) (ed25519.PrivateKey, error) {
	block, _ := pem.Decode(b)
	if block == nil || block.Type != pemPrivate {
		return nil, fmt.Errorf("decoding private key: no %q PEM block", pemPrivate)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("decoding private key: %w", err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("decoding private key: %T is not an Ed25519 key", k)
	}
	return priv, nil
}

// ReadPublicKey reads a public key file written by GenerateKey.
func ReadPublicKey(path string) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading public key: %w", err)
	}
	return ParsePublicKey(b)
}

// ReadPrivateKey reads a private key file written by GenerateKey.
func ReadPrivateKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading private key: %w", err)
	}
	return ParsePrivateKey(b)
}
