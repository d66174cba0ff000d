// Package dsse is Lethe's one implementation of DSSE envelopes (Dead Simple Signing
// Envelope): a payload type, a payload, and Ed25519 signatures over DSSE's pre-authentication
// encoding (PAE) of both. Receipts, signed policies and the keybroker's release grants are
// all DSSE envelopes, each with its own payload type, and all decode through this package.
//
// Decoding is strict where leniency would let two verifiers see different documents. Member
// names must match exactly, and a member whose name differs from one of DSSE's only in case
// ("Payload", "PAYLOADTYPE", "Sig") is refused: Go's encoding/json would read it as that
// member, other decoders would ignore it. A name that appears twice is refused, in the
// envelope and in each signature (decoders disagree on which one counts). Byte strings are
// base64, standard or URL-safe, padded or not, as the DSSE specification allows, but never
// both alphabets in one string. The input must be UTF-8 with nothing after the envelope.
// Other members are ignored, as DSSE requires (their values need only be well-formed JSON).
// So an envelope that carries a signed payload in "payload" and a second, unsigned one under
// another spelling is refused, instead of being verified against one payload and shown with
// the other.
//
// A key ID is "sha256:" and the hex SHA-256 of the key's PKIX (DER) encoding: a hint that
// verification does not rely on.
//
// This package imports no network, Vault or NATS code and must never do so.
package dsse

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxSignatures bounds the signatures an envelope may carry.
const MaxSignatures = 8

// ErrSignature is returned (wrapped) by Verify when no signature of the envelope verifies
// with the given key.
var ErrSignature = errors.New("no valid signature")

// ErrMalformed is returned (wrapped) by Parse and UnmarshalJSON for bytes that are not a
// well-formed envelope.
var ErrMalformed = errors.New("malformed DSSE envelope")

// Envelope is a DSSE envelope. It encodes as DSSE's JSON (byte strings as standard base64)
// and decodes strictly (see the package documentation).
type Envelope struct {
	PayloadType string      `json:"payloadType"`
	Payload     []byte      `json:"payload"`
	Signatures  []Signature `json:"signatures"`
}

// Signature is one signature of an envelope.
type Signature struct {
	// KeyID names the signing key (see KeyID); a hint, verification does not rely on it.
	KeyID string `json:"keyid,omitempty"`
	Sig   []byte `json:"sig"`
}

// PAE returns DSSE's pre-authentication encoding of payloadType and payload: the bytes that
// are signed.
func PAE(payloadType string, payload []byte) []byte {
	b := make([]byte, 0, len("DSSEv1 ")+len(payloadType)+len(payload)+24)
	b = append(b, "DSSEv1 "...)
	b = strconv.AppendInt(b, int64(len(payloadType)), 10)
	b = append(b, ' ')
	b = append(b, payloadType...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, int64(len(payload)), 10)
	b = append(b, ' ')
	return append(b, payload...)
}

// KeyID returns the key ID of an Ed25519 public key: "sha256:" and the hex SHA-256 of its
// PKIX encoding. It returns "" for a key of the wrong size.
func KeyID(pub ed25519.PublicKey) string {
	if len(pub) != ed25519.PublicKeySize {
		return ""
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Sign returns an envelope of payload signed by sign, which signs the PAE bytes it is given
// with the Ed25519 key pub (ed25519.Sign, or a Vault Transit call). The signature is checked
// against pub before it is returned.
func Sign(payloadType string, payload []byte, pub ed25519.PublicKey, sign func(msg []byte) ([]byte, error)) (*Envelope, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("signing envelope: public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	msg := PAE(payloadType, payload)
	sig, err := sign(msg)
	if err != nil {
		return nil, fmt.Errorf("signing envelope: %w", err)
	}
	if !ed25519.Verify(pub, msg, sig) {
		return nil, fmt.Errorf("signing envelope: the signature does not verify with key %s", KeyID(pub))
	}
	return &Envelope{
		PayloadType: payloadType,
		Payload:     bytes.Clone(payload),
		Signatures:  []Signature{{KeyID: KeyID(pub), Sig: sig}},
	}, nil
}

// Verify checks that env has payload type payloadType and a signature that verifies with
// pub, and returns the payload. It returns an error wrapping ErrSignature when no signature
// verifies, ErrMalformed for another payload type.
func (env *Envelope) Verify(payloadType string, pub ed25519.PublicKey) ([]byte, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("verifying envelope: public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if env.PayloadType != payloadType {
		return nil, fmt.Errorf("verifying envelope: payload type %q, want %q: %w", env.PayloadType, payloadType, ErrMalformed)
	}
	msg := PAE(env.PayloadType, env.Payload)
	for _, s := range env.Signatures {
		if ed25519.Verify(pub, msg, s.Sig) {
			return env.Payload, nil
		}
	}
	return nil, fmt.Errorf("verifying envelope: %w by key %s", ErrSignature, KeyID(pub))
}

// Parse decodes an envelope strictly; it proves nothing (Verify does). Envelopes larger than
// maxSize bytes are refused, and so is JSON null. Errors wrap ErrMalformed.
func Parse(b []byte, maxSize int) (*Envelope, error) {
	if len(b) > maxSize {
		return nil, fmt.Errorf("%w: %d bytes exceeds the %d-byte limit", ErrMalformed, len(b), maxSize)
	}
	var env Envelope
	if err := env.decode(b); err != nil {
		return nil, err
	}
	return &env, nil
}

// UnmarshalJSON decodes an envelope strictly, so that an envelope inside any JSON document
// decodes the way Parse does. As encoding/json's convention asks, JSON null leaves env
// unchanged (a null *Envelope field stays nil). Errors wrap ErrMalformed.
func (env *Envelope) UnmarshalJSON(b []byte) error {
	if isNull(b) {
		return nil
	}
	return env.decode(b)
}

// UnmarshalJSON decodes one signature strictly (see the package documentation), as an
// envelope's UnmarshalJSON does. JSON null leaves s unchanged. Errors wrap ErrMalformed.
func (s *Signature) UnmarshalJSON(b []byte) error {
	if isNull(b) {
		return nil
	}
	if !utf8.Valid(b) {
		return fmt.Errorf("%w: signature: not UTF-8", ErrMalformed)
	}
	out, err := decodeSignature(b)
	if err != nil {
		return fmt.Errorf("%w: signature: %w", ErrMalformed, err)
	}
	*s = out
	return nil
}

// The member names of an envelope and of a signature. Only these exact spellings are read.
var (
	envelopeMembers  = []string{"payloadType", "payload", "signatures"}
	signatureMembers = []string{"keyid", "sig"}
)

// decode decodes b strictly into env, which it changes only on success. Errors wrap
// ErrMalformed.
func (env *Envelope) decode(b []byte) error {
	// encoding/json would replace invalid UTF-8 in strings by U+FFFD, where other decoders
	// refuse it or keep the bytes.
	if !utf8.Valid(b) {
		return fmt.Errorf("%w: not UTF-8", ErrMalformed)
	}
	fields, err := object(b, envelopeMembers)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	var out Envelope
	pt, ok := fields["payloadType"]
	if !ok {
		return fmt.Errorf("%w: no payloadType", ErrMalformed)
	}
	if out.PayloadType, err = stringField(pt); err != nil {
		return fmt.Errorf("%w: payloadType: %w", ErrMalformed, err)
	}
	p, ok := fields["payload"]
	if !ok {
		return fmt.Errorf("%w: no payload", ErrMalformed)
	}
	if out.Payload, err = base64Field(p); err != nil {
		return fmt.Errorf("%w: payload: %w", ErrMalformed, err)
	}
	sigs, ok := fields["signatures"]
	if !ok {
		return fmt.Errorf("%w: no signatures", ErrMalformed)
	}
	if len(sigs) == 0 || sigs[0] != '[' {
		return fmt.Errorf("%w: signatures is not an array", ErrMalformed)
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(sigs, &raw); err != nil {
		return fmt.Errorf("%w: signatures: %w", ErrMalformed, err)
	}
	if len(raw) == 0 || len(raw) > MaxSignatures {
		return fmt.Errorf("%w: %d signatures, want 1 to %d", ErrMalformed, len(raw), MaxSignatures)
	}
	for i, r := range raw {
		s, err := decodeSignature(r)
		if err != nil {
			return fmt.Errorf("%w: signature %d: %w", ErrMalformed, i, err)
		}
		out.Signatures = append(out.Signatures, s)
	}
	*env = out
	return nil
}

// decodeSignature decodes one signature object strictly.
func decodeSignature(b []byte) (Signature, error) {
	var s Signature
	fields, err := object(b, signatureMembers)
	if err != nil {
		return s, err
	}
	if k, ok := fields["keyid"]; ok {
		if s.KeyID, err = stringField(k); err != nil {
			return s, fmt.Errorf("decoding keyid: %w", err)
		}
	}
	sig, ok := fields["sig"]
	if !ok {
		return s, errors.New("no sig")
	}
	if s.Sig, err = base64Field(sig); err != nil {
		return s, fmt.Errorf("decoding sig: %w", err)
	}
	return s, nil
}

// object decodes one JSON object into its members. It refuses a key that appears twice, a
// key that differs from one of known only in case (which encoding/json would take for it),
// and anything but white space after the object. Members it does not know are kept unread.
func object(b []byte, known []string) (map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	out := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, errors.New("object key is not a string")
		}
		for _, k := range known {
			if key != k && strings.EqualFold(key, k) {
				return nil, fmt.Errorf("member %q is not %q", key, k)
			}
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("decoding member %q: %w", key, err)
		}
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("member %q appears twice", key)
		}
		out[key] = v
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the object")
	}
	return out, nil
}

// isNull reports whether b is the JSON literal null.
func isNull(b []byte) bool { return string(bytes.TrimSpace(b)) == "null" }

// stringField decodes a JSON string; null and other types are refused.
func stringField(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || raw[0] != '"' {
		return "", errors.New("not a string")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", err
	}
	return s, nil
}

// base64Field decodes a JSON string of base64, standard or URL-safe, padded or not. It
// refuses both alphabets in one string, line breaks, and encodings with non-zero trailing
// bits (each byte string has one encoding per alphabet and padding).
func base64Field(raw json.RawMessage) ([]byte, error) {
	s, err := stringField(raw)
	if err != nil {
		return nil, err
	}
	if strings.ContainsAny(s, "\r\n") {
		return nil, errors.New("base64 with line breaks")
	}
	url := strings.ContainsAny(s, "-_")
	if url && strings.ContainsAny(s, "+/") {
		return nil, errors.New("base64 mixes the standard and URL-safe alphabets")
	}
	padded := strings.HasSuffix(s, "=")
	switch {
	case url && padded:
		return base64.URLEncoding.Strict().DecodeString(s)
	case url:
		return base64.RawURLEncoding.Strict().DecodeString(s)
	case padded:
		return base64.StdEncoding.Strict().DecodeString(s)
	}
	return base64.RawStdEncoding.Strict().DecodeString(s)
}
