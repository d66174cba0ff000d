package receipt

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strconv"
)

// PayloadType is the DSSE payload type of a receipt.
const PayloadType = "application/vnd.lethe.receipt+json"

// MaxEnvelopeSize bounds the envelopes Parse accepts.
const MaxEnvelopeSize = 1 << 20

// ErrInvalid is returned (wrapped) by Verify for an envelope that is not a valid receipt
// signed by the given key.
var ErrInvalid = errors.New("receipt invalid")

// Envelope is a DSSE-style signed envelope.
type Envelope struct {
	PayloadType string      `json:"payloadType"`
	Payload     []byte      `json:"payload"`
	Signatures  []Signature `json:"signatures"`
}

// Signature is one signature of an envelope. KeyID is KeyID of the signing public key.
type Signature struct {
	KeyID string `json:"keyid"`
	Sig   []byte `json:"sig"`
}

// PAE returns DSSE's pre-authentication encoding of payloadType and payload: the bytes that
// are signed.
func PAE(payloadType string, payload []byte) []byte {
	b := []byte("DSSEv1 ")
	b = strconv.AppendInt(b, int64(len(payloadType)), 10)
	b = append(b, ' ')
	b = append(b, payloadType...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, int64(len(payload)), 10)
	b = append(b, ' ')
	return append(b, payload...)
}

// KeyID returns the identifier of an Ed25519 public key in envelopes: the hex SHA-256 of its
// PKIX encoding.
func KeyID(pub ed25519.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// Parse decodes an envelope. It proves nothing; Verify does.
func Parse(b []byte) (*Envelope, error) {
	if len(b) > MaxEnvelopeSize {
		return nil, fmt.Errorf("decoding receipt envelope: %d bytes exceeds the %d-byte limit", len(b), MaxEnvelopeSize)
	}
	var env Envelope
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, fmt.Errorf("decoding receipt envelope: %w", err)
	}
	return &env, nil
}

// Decode returns the receipt in env's payload without checking any signature, for display.
func (env *Envelope) Decode() (*Receipt, error) {
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("decoding receipt: payload type %q, want %q", env.PayloadType, PayloadType)
	}
	var r Receipt
	if err := json.Unmarshal(env.Payload, &r); err != nil {
		return nil, fmt.Errorf("decoding receipt: %w", err)
	}
	return &r, nil
}

// Verify checks that env carries a valid Ed25519 signature by pub over its payload and that
// the payload is a complete receipt, and returns the receipt. It returns an error wrapping
// ErrInvalid when it does not.
func Verify(env *Envelope, pub ed25519.PublicKey) (*Receipt, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("verifying receipt: public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("verifying receipt: payload type %q, want %q: %w", env.PayloadType, PayloadType, ErrInvalid)
	}
	msg := PAE(env.PayloadType, env.Payload)
	id := KeyID(pub)
	ok := false
	for _, s := range env.Signatures {
		if s.KeyID != "" && s.KeyID != id {
			continue
		}
		if ed25519.Verify(pub, msg, s.Sig) {
			ok = true
			break
		}
	}
	if !ok {
		return nil, fmt.Errorf("verifying receipt: no valid signature by key %s: %w", id, ErrInvalid)
	}
	r, err := env.Decode()
	if err != nil {
		return nil, fmt.Errorf("verifying receipt: %w: %w", ErrInvalid, err)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("verifying receipt: %w: %w", ErrInvalid, err)
	}
	return r, nil
}

// Sign returns an envelope for r signed by sign, which signs the PAE bytes it is given with
// the Ed25519 key pub and returns the signature. The keybroker's sign calls Vault Transit;
// tests may use ed25519.Sign.
func Sign(r *Receipt, pub ed25519.PublicKey, sign func(msg []byte) ([]byte, error)) (*Envelope, error) {
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("signing receipt: %w", err)
	}
	payload, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("signing receipt: %w", err)
	}
	sig, err := sign(PAE(PayloadType, payload))
	if err != nil {
		return nil, fmt.Errorf("signing receipt: %w", err)
	}
	if !ed25519.Verify(pub, PAE(PayloadType, payload), sig) {
		return nil, fmt.Errorf("signing receipt: the signature does not verify with key %s", KeyID(pub))
	}
	return &Envelope{PayloadType: PayloadType, Payload: payload, Signatures: []Signature{{KeyID: KeyID(pub), Sig: sig}}}, nil
}

// MarshalPublicKeyPEM encodes pub as a PEM "PUBLIC KEY" block (PKIX), the form tenants pin.
func MarshalPublicKeyPEM(pub ed25519.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encoding public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParsePublicKeyPEM decodes a PEM "PUBLIC KEY" block holding an Ed25519 key.
func ParsePublicKeyPEM(b []byte) (ed25519.PublicKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, errors.New("decoding public key: no PEM PUBLIC KEY block")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("decoding public key: %w", err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("decoding public key: %T is not an Ed25519 key", k)
	}
	return pub, nil
}
