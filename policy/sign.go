package policy

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
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

// Envelope is a signed policy: a DSSE envelope whose payload is the exact YAML bytes of the
// policy and whose signatures are Ed25519 signatures over the payload's pre-authentication
// encoding (PAE). It encodes as DSSE's JSON (byte strings base64).
type Envelope struct {
	PayloadType string      `json:"payloadType"`
	Payload     []byte      `json:"payload"`
	Signatures  []Signature `json:"signatures"`
}

// Signature is one signature of an envelope.
type Signature struct {
	// KeyID is a hint naming the key (see KeyID); verification does not rely on it.
	KeyID string `json:"keyid,omitempty"`
	Sig   []byte `json:"sig"`
}

// maxSignatures bounds the signatures an envelope may carry.
const maxSignatures = 8

// PAE returns DSSE's pre-authentication encoding of a payload: the bytes that are signed.
func PAE(payloadType string, payload []byte) []byte {
	var b bytes.Buffer
	b.WriteString("DSSEv1 ")
	b.WriteString(strconv.Itoa(len(payloadType)))
	b.WriteByte(' ')
	b.WriteString(payloadType)
	b.WriteByte(' ')
	b.WriteString(strconv.Itoa(len(payload)))
	b.WriteByte(' ')
	b.Write(payload)
	return b.Bytes()
}

// KeyID names a public key: "sha256:" and the hex SHA-256 of its PKIX encoding.
func KeyID(pub ed25519.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Sign parses policyYAML (refusing to sign a policy that does not parse) and returns it in an
// envelope signed with key.
func Sign(file string, policyYAML []byte, key ed25519.PrivateKey) (*Envelope, error) {
	if _, err := Parse(file, policyYAML); err != nil {
		return nil, fmt.Errorf("signing policy: %w", err)
	}
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("signing policy: private key is %d bytes, want %d", len(key), ed25519.PrivateKeySize)
	}
	payload := bytes.Clone(policyYAML)
	sig := ed25519.Sign(key, PAE(PayloadType, payload))
	return &Envelope{
		PayloadType: PayloadType,
		Payload:     payload,
		Signatures:  []Signature{{KeyID: KeyID(key.Public().(ed25519.PublicKey)), Sig: sig}},
	}, nil
}

// Marshal encodes the envelope as JSON.
func (env *Envelope) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(env, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding envelope: %w", err)
	}
	return append(b, '\n'), nil
}

// ParseEnvelope decodes an envelope. It checks shape only (payload type, size, at least one
// signature); it proves nothing.
func ParseEnvelope(b []byte) (*Envelope, error) {
	if len(b) > 2*MaxSize {
		return nil, fmt.Errorf("decoding envelope: %d bytes exceeds the %d-byte limit", len(b), 2*MaxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var env Envelope
	if err := dec.Decode(&env); err != nil {
		return nil, fmt.Errorf("decoding envelope: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decoding envelope: trailing data")
	}
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("decoding envelope: payload type %q, want %q", env.PayloadType, PayloadType)
	}
	if len(env.Signatures) == 0 || len(env.Signatures) > maxSignatures {
		return nil, fmt.Errorf("decoding envelope: %d signatures, want 1 to %d", len(env.Signatures), maxSignatures)
	}
	if len(env.Payload) > MaxSize {
		return nil, fmt.Errorf("decoding envelope: payload of %d bytes exceeds the %d-byte limit", len(env.Payload), MaxSize)
	}
	return &env, nil
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
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("verifying policy: public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("verifying policy: payload type %q, want %q", env.PayloadType, PayloadType)
	}
	msg := PAE(env.PayloadType, env.Payload)
	verified := false
	for _, s := range env.Signatures {
		if ed25519.Verify(pub, msg, s.Sig) {
			verified = true
			break
		}
	}
	if !verified {
		return nil, fmt.Errorf("verifying policy: %w (key %s)", ErrSignature, KeyID(pub))
	}
	p, err := Parse("signed policy", env.Payload)
	if err != nil {
		return nil, fmt.Errorf("verifying policy: %w", err)
	}
	return p, nil
}

// CheckRollback returns an error matching ErrRollback if p's policySvn is lower than
// lastAccepted, the last policySvn accepted for p's tenant. The same policySvn is accepted
// again.
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
	if err := writeNew(filepath.Join(dir, PrivateKeyFile), pem.EncodeToMemory(&pem.Block{Type: pemPrivate, Bytes: privDER}), 0o600); err != nil {
		return nil, err
	}
	if err := writeNew(filepath.Join(dir, PublicKeyFile), pubPEM, 0o644); err != nil {
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
