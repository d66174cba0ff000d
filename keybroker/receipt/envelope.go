package receipt

import (
	"crypto/ed25519"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/lethe-cc/lethe/internal/dsse"
)

// PayloadType is the DSSE payload type of a receipt.
const PayloadType = "application/vnd.lethe.receipt+json"

// MaxEnvelopeSize bounds the envelopes Parse accepts.
const MaxEnvelopeSize = 1 << 20

// ErrInvalid is returned (wrapped) by Parse and Verify for an envelope that is not a valid
// receipt signed by the given key.
var ErrInvalid = errors.New("receipt invalid")

// Envelope is a receipt's DSSE envelope (package dsse: strict decoding, "sha256:" key IDs).
// It encodes as DSSE's JSON and decodes strictly wherever it is decoded, inside another JSON
// document (kbwire's DestroyResponse) as with Parse.
type Envelope dsse.Envelope

// Signature is one signature of an envelope.
type Signature = dsse.Signature

// UnmarshalJSON decodes an envelope strictly, as Parse does but without its size limit; see
// dsse.Envelope.UnmarshalJSON. Errors wrap dsse.ErrMalformed.
func (env *Envelope) UnmarshalJSON(b []byte) error {
	return (*dsse.Envelope)(env).UnmarshalJSON(b)
}

// KeyID returns the identifier of an Ed25519 public key in envelopes: "sha256:" and the hex
// SHA-256 of its PKIX encoding (dsse.KeyID).
func KeyID(pub ed25519.PublicKey) string { return dsse.KeyID(pub) }

// Parse decodes an envelope of at most MaxEnvelopeSize bytes strictly (see package dsse). It
// proves nothing; Verify does. Errors wrap ErrInvalid and dsse.ErrMalformed.
func Parse(b []byte) (*Envelope, error) {
	env, err := dsse.Parse(b, MaxEnvelopeSize)
	if err != nil {
		return nil, fmt.Errorf("decoding receipt envelope: %w: %w", ErrInvalid, err)
	}
	return (*Envelope)(env), nil
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

// Verify checks that env has the receipt payload type and a valid Ed25519 signature by pub
// over its payload, and that the payload is a complete receipt (Receipt.Validate), and returns
// the receipt. Signatures' key IDs are not consulted. It returns an error wrapping ErrInvalid
// when the receipt is not valid, and another error for a public key of the wrong size.
func Verify(env *Envelope, pub ed25519.PublicKey) (*Receipt, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("verifying receipt: public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if _, err := (*dsse.Envelope)(env).Verify(PayloadType, pub); err != nil {
		return nil, fmt.Errorf("verifying receipt: %w: %w", ErrInvalid, err)
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
// tests may use ed25519.Sign. It refuses an incomplete receipt (Receipt.Validate) and a
// signature that does not verify with pub.
func Sign(r *Receipt, pub ed25519.PublicKey, sign func(msg []byte) ([]byte, error)) (*Envelope, error) {
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("signing receipt: %w", err)
	}
	payload, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("signing receipt: %w", err)
	}
	env, err := dsse.Sign(PayloadType, payload, pub, sign)
	if err != nil {
		return nil, fmt.Errorf("signing receipt: %w", err)
	}
	return (*Envelope)(env), nil
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
