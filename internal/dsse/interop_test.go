package dsse_test

// This file holds a second DSSE implementation, written from the specification
// (github.com/secure-systems-lab/dsse, envelope.md and protocol.md) and sharing no code with
// package dsse: its own PAE, its own key ID (the SubjectPublicKeyInfo assembled by hand), its
// own JSON reading (a map, exact names, as a JavaScript or Python verifier reads it), its own
// base64 reading (either alphabet, padding optional). Envelopes travel both ways between it
// and Lethe (receipts, policies, package dsse itself), and the envelopes on which decoders
// can disagree are checked to be refused by Lethe.

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/internal/dsse"
	"github.com/lethe-cc/lethe/keybroker/receipt"
	"github.com/lethe-cc/lethe/policy"
)

// testPayload has bytes whose base64 holds '+' and '/' (so the URL-safe form differs) and a
// length that needs padding.
var testPayload = []byte("\xfb\xff\xbf lethe \xfb\xff\xbf!")

// refEnvelope is an envelope as the reference implementation reads it.
type refEnvelope struct {
	PayloadType string
	Payload     []byte
	Signatures  []refSignature
}

type refSignature struct {
	KeyID string
	Sig   []byte
}

// lethe converts r for comparison with what package dsse decoded.
func (r *refEnvelope) lethe() *dsse.Envelope {
	env := &dsse.Envelope{PayloadType: r.PayloadType, Payload: r.Payload}
	for _, s := range r.Signatures {
		env.Signatures = append(env.Signatures, dsse.Signature{KeyID: s.KeyID, Sig: s.Sig})
	}
	return env
}

// refPAE is PAE as protocol.md writes it.
func refPAE(payloadType string, body []byte) []byte {
	return fmt.Appendf(nil, "DSSEv1 %d %s %d %s", len(payloadType), payloadType, len(body), body)
}

// ed25519SPKIPrefix is the DER of an Ed25519 SubjectPublicKeyInfo up to the key (RFC 8410
// §4): SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (33 bytes, 0 unused bits) }.
var ed25519SPKIPrefix = []byte{0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00}

func refKeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(append(bytes.Clone(ed25519SPKIPrefix), pub...))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// refBase64 reads base64 as DSSE allows it: the URL-safe alphabet is mapped to the standard
// one and padding is optional.
func refBase64(s string) ([]byte, error) {
	s = strings.NewReplacer("-", "+", "_", "/").Replace(strings.TrimRight(s, "="))
	return base64.RawStdEncoding.DecodeString(s)
}

// refParse reads an envelope the way a verifier in a dynamic language does: JSON into a map
// (names matched exactly; of a name given twice the map keeps the last), other members
// ignored.
func refParse(b []byte) (*refEnvelope, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data")
	}
	pt, ok1 := m["payloadType"].(string)
	p, ok2 := m["payload"].(string)
	sigs, ok3 := m["signatures"].([]any)
	if !ok1 || !ok2 || !ok3 {
		return nil, errors.New("payloadType, payload or signatures missing or not of their type")
	}
	payload, err := refBase64(p)
	if err != nil {
		return nil, fmt.Errorf("payload: %w", err)
	}
	env := &refEnvelope{PayloadType: pt, Payload: payload}
	for _, s := range sigs {
		sm, ok := s.(map[string]any)
		if !ok {
			return nil, errors.New("signature is not an object")
		}
		sigStr, ok := sm["sig"].(string)
		if !ok {
			return nil, errors.New("signature without sig")
		}
		sig, err := refBase64(sigStr)
		if err != nil {
			return nil, fmt.Errorf("sig: %w", err)
		}
		var keyID string
		if k, present := sm["keyid"]; present {
			if keyID, ok = k.(string); !ok {
				return nil, errors.New("keyid is not a string")
			}
		}
		env.Signatures = append(env.Signatures, refSignature{KeyID: keyID, Sig: sig})
	}
	return env, nil
}

// refVerify accepts env when its payload type is payloadType and any signature verifies.
func refVerify(env *refEnvelope, payloadType string, pub ed25519.PublicKey) bool {
	if env.PayloadType != payloadType {
		return false
	}
	for _, s := range env.Signatures {
		if ed25519.Verify(pub, refPAE(env.PayloadType, env.Payload), s.Sig) {
			return true
		}
	}
	return false
}

// refOptions say how refEncode writes an envelope.
type refOptions struct {
	enc      *base64.Encoding // nil: standard, padded
	noKeyID  bool
	extra    map[string]any // unknown members of the envelope
	extraSig map[string]any // unknown members of each signature
	badFirst bool           // a signature by another key before the good one
}

// refSign signs payload with testKey(1) and returns the envelope's members as a map.
func refSign(payloadType string, payload []byte, o refOptions) map[string]any {
	enc := o.enc
	if enc == nil {
		enc = base64.StdEncoding
	}
	sigOf := func(n byte) map[string]any {
		pub, priv := testKey(n)
		s := map[string]any{"sig": enc.EncodeToString(ed25519.Sign(priv, refPAE(payloadType, payload)))}
		if !o.noKeyID {
			s["keyid"] = refKeyID(pub)
		}
		for k, v := range o.extraSig {
			s[k] = v
		}
		return s
	}
	sigs := []any{sigOf(1)}
	if o.badFirst {
		sigs = []any{sigOf(2), sigOf(1)}
	}
	m := map[string]any{
		"payloadType": payloadType,
		"payload":     enc.EncodeToString(payload),
		"signatures":  sigs,
	}
	for k, v := range o.extra {
		m[k] = v
	}
	return m
}

func refEncode(t testing.TB, payloadType string, payload []byte, o refOptions) []byte {
	t.Helper()
	b, err := json.Marshal(refSign(payloadType, payload, o))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// refVariants are the ways the reference implementation writes a valid envelope.
func refVariants() map[string]refOptions {
	return map[string]refOptions{
		"standard base64":                        {enc: base64.StdEncoding},
		"standard base64 without padding":        {enc: base64.RawStdEncoding},
		"URL-safe base64":                        {enc: base64.URLEncoding},
		"URL-safe base64 without padding":        {enc: base64.RawURLEncoding},
		"unknown members":                        {extra: map[string]any{"comment": "x", "PAYLOAD_V2": map[string]any{"payload": 1}, "n": 1e300}, extraSig: map[string]any{"cert": nil}},
		"no keyid":                               {noKeyID: true},
		"two signatures, the first bad":          {badFirst: true},
		"URL-safe, unpadded, no keyid, two sigs": {enc: base64.RawURLEncoding, noKeyID: true, badFirst: true},
	}
}

// lethePayloads are the payloads of Lethe's three envelope kinds, each with the Lethe
// verifier for that kind.
func lethePayloads(t testing.TB) map[string]struct {
	payloadType string
	payload     []byte
	verify      func(b []byte, pub ed25519.PublicKey) ([]byte, error)
} {
	t.Helper()
	r := testReceipt()
	rb, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return map[string]struct {
		payloadType string
		payload     []byte
		verify      func(b []byte, pub ed25519.PublicKey) ([]byte, error)
	}{
		"dsse": {testType, testPayload, func(b []byte, pub ed25519.PublicKey) ([]byte, error) {
			env, err := dsse.Parse(b, 1<<20)
			if err != nil {
				return nil, err
			}
			return env.Verify(testType, pub)
		}},
		"receipt": {receipt.PayloadType, rb, func(b []byte, pub ed25519.PublicKey) ([]byte, error) {
			env, err := receipt.Parse(b)
			if err != nil {
				return nil, err
			}
			got, err := receipt.Verify(env, pub)
			if err != nil {
				return nil, err
			}
			return json.Marshal(got)
		}},
		"policy": {policy.PayloadType, []byte(testPolicy), func(b []byte, pub ed25519.PublicKey) ([]byte, error) {
			p, err := policy.Verify(b, pub)
			if err != nil {
				return nil, err
			}
			return p.Raw(), nil
		}},
	}
}

const testPolicy = `apiVersion: lethe.dev/v1
kind: MigrationPolicy
metadata:
  tenant: acme
  name: db
  policySvn: 4
`

func testReceipt() *receipt.Receipt {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	return &receipt.Receipt{
		Kind: receipt.Kind, MigrationID: "m1", Tenant: "acme", VM: "vm1", Outcome: receipt.OutcomeAborted,
		Policy:        receipt.PolicyRef{Digest: make([]byte, 32), SVN: 4},
		FromEpoch:     1,
		ToEpoch:       2,
		DestroyedKeys: []receipt.DestroyedKey{{Name: "lethe-mig-m1", LatestVersion: 1, DestroyedAt: at}},
		EndedAt:       at,
		IssuedAt:      at,
	}
}

// TestLetheToReference checks that envelopes Lethe signs verify with the reference
// implementation and carry the key ID it computes.
func TestLetheToReference(t *testing.T) {
	pub, priv := testKey(1)
	sign := signer(priv)
	policyEnv, err := policy.Sign("p.yaml", []byte(testPolicy), priv)
	if err != nil {
		t.Fatal(err)
	}
	policyJSON, err := policyEnv.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	receiptEnv, err := receipt.Sign(testReceipt(), pub, sign)
	if err != nil {
		t.Fatal(err)
	}
	dsseEnv, err := dsse.Sign(testType, testPayload, pub, sign)
	if err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		payloadType string
		envelope    any
	}{
		"policy.Sign":  {policy.PayloadType, json.RawMessage(policyJSON)},
		"receipt.Sign": {receipt.PayloadType, receiptEnv},
		"dsse.Sign":    {testType, dsseEnv},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			b, err := json.Marshal(tc.envelope)
			if err != nil {
				t.Fatal(err)
			}
			env, err := refParse(b)
			if err != nil {
				t.Fatalf("reference decoder: %v\n%s", err, b)
			}
			if !refVerify(env, tc.payloadType, pub) {
				t.Errorf("the reference verifier refuses %s", b)
			}
			if got, want := env.Signatures[0].KeyID, refKeyID(pub); got != want {
				t.Errorf("keyid %q, want %q", got, want)
			}
			// And nothing else verifies: another key, another payload type.
			other, _ := testKey(2)
			if refVerify(env, tc.payloadType, other) || refVerify(env, tc.payloadType+"x", pub) {
				t.Error("the reference verifier accepts it with another key or payload type")
			}
		})
	}
}

// TestReferenceToLethe checks that envelopes the reference implementation writes, in every
// form DSSE allows, verify with Lethe's decoder and verifier of each kind.
func TestReferenceToLethe(t *testing.T) {
	pub, _ := testKey(1)
	for kind, k := range lethePayloads(t) {
		for name, o := range refVariants() {
			t.Run(kind+"/"+name, func(t *testing.T) {
				b := refEncode(t, k.payloadType, k.payload, o)
				if o.enc == base64.URLEncoding && kind == "dsse" && !bytes.ContainsAny(b, "-_") {
					t.Fatalf("the URL-safe envelope has no URL-safe character: %s", b)
				}
				got, err := k.verify(b, pub)
				if err != nil {
					t.Fatalf("Lethe refuses %s: %v", b, err)
				}
				if kind != "receipt" && !bytes.Equal(got, k.payload) {
					t.Errorf("payload %q, want %q", got, k.payload)
				}
			})
		}
	}
}

// differentialCase is an envelope Lethe must refuse because decoders read it differently,
// and whether the reference verifier accepts it.
type differentialCase struct {
	name       string
	envelope   []byte
	refAccepts bool
}

// differentialCases builds, for testPayload signed by testKey(1), the envelopes on which DSSE
// decoders disagree.
func differentialCases(t testing.TB) []differentialCase {
	return differentialCasesFor(t, testType, testPayload)
}

func differentialCasesFor(t testing.TB, payloadType string, payload []byte) []differentialCase {
	t.Helper()
	m := refSign(payloadType, payload, refOptions{})
	q := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	pt, p, sigs := q(m["payloadType"]), q(m["payload"]), q(m["signatures"])
	sig := m["signatures"].([]any)[0].(map[string]any)
	sigB64, keyID := sig["sig"].(string), q(sig["keyid"])
	unsigned := q(base64.StdEncoding.EncodeToString([]byte(`{"unsigned":true}`)))
	obj := func(members ...string) []byte { return []byte("{" + strings.Join(members, ",") + "}") }
	member := func(name, value string) string { return q(name) + ":" + value }
	withSig := func(sigMembers ...string) []byte {
		return obj(member("payloadType", pt), member("payload", p), member("signatures", "[{"+strings.Join(sigMembers, ",")+"}]"))
	}
	good := obj(member("payloadType", pt), member("payload", p), member("signatures", sigs))

	// Base64 that mixes the alphabets: the first '+' or '/' of the standard form in its
	// URL-safe spelling, the others left. ok is false when s has fewer than two.
	mix := func(s string) (mixed string, ok bool) {
		i := strings.IndexAny(s, "+/")
		if i < 0 || !strings.ContainsAny(s[i+1:], "+/") {
			return "", false
		}
		return s[:i] + map[byte]string{'+': "-", '/': "_"}[s[i]] + s[i+1:], true
	}
	pStr := m["payload"].(string)
	// Padding that is not the one the length calls for.
	badPadding := pStr + "="
	if strings.HasSuffix(pStr, "==") {
		badPadding = strings.TrimSuffix(pStr, "=")
	}

	cases := []differentialCase{
		// An unsigned payload beside the signed one, under a name encoding/json folds to
		// "payload": encoding/json reads the last of them, DSSE verifiers "payload".
		{"Payload after payload, signed under Payload", obj(member("payloadType", pt), member("payload", unsigned), member("Payload", p), member("signatures", sigs)), false},
		{"Payload after payload, signed under payload", obj(member("payloadType", pt), member("payload", p), member("Payload", unsigned), member("signatures", sigs)), true},
		{"Payload before payload", obj(member("payloadType", pt), member("Payload", unsigned), member("payload", p), member("signatures", sigs)), true},
		{"PAYLOAD beside payload", obj(member("payloadType", pt), member("payload", p), member("PAYLOAD", unsigned), member("signatures", sigs)), true},
		{"pAyLoAd beside payload", obj(member("payloadType", pt), member("pAyLoAd", unsigned), member("payload", p), member("signatures", sigs)), true},
		{"Payload alone", obj(member("payloadType", pt), member("Payload", p), member("signatures", sigs)), false},
		{"payload twice", obj(member("payloadType", pt), member("payload", unsigned), member("payload", p), member("signatures", sigs)), true},
		{"payload twice, one name escaped", obj(member("payloadType", pt), member("payload", unsigned), `"p\u0061yload":`+p, member("signatures", sigs)), true},
		{"signatures twice", obj(member("payloadType", pt), member("payload", p), member("signatures", `[{"sig":"AAAA"}]`), member("signatures", sigs)), true},
		{"Signatures beside signatures", obj(member("payloadType", pt), member("payload", p), member("signatures", sigs), member("Signatures", `[{"sig":"AAAA"}]`)), true},
		{"signatures with a long s (U+017F) beside signatures", obj(member("payloadType", pt), member("payload", p), member("signatures", sigs), member("\u017fignatures", `[]`)), true},
		{"PayloadType instead of payloadType", obj(member("PayloadType", pt), member("payload", p), member("signatures", sigs)), false},
		{"payloadtype beside payloadType", obj(member("payloadType", pt), member("payloadtype", q("text/plain")), member("payload", p), member("signatures", sigs)), true},
		{"payloadType twice", obj(member("payloadType", q("text/plain")), member("payloadType", pt), member("payload", p), member("signatures", sigs)), true},
		{"sig twice in a signature", withSig(member("keyid", keyID), member("sig", q("AAAA")), member("sig", q(sigB64))), true},
		{"Sig beside sig", withSig(member("keyid", keyID), member("sig", q(sigB64)), member("Sig", q("AAAA"))), true},
		{"keyid twice", withSig(member("keyid", keyID), member("keyid", q("other")), member("sig", q(sigB64))), true},
		{"keyid with a Kelvin sign (U+212A) beside keyid", withSig(member("keyid", keyID), member("\u212aeyid", q("other")), member("sig", q(sigB64))), true},
		{"trailing text", append(bytes.Clone(good), 'x'), false},
		{"trailing object", append(bytes.Clone(good), []byte(` {}`)...), false},
		{"trailing bracket", append(bytes.Clone(good), ']'), false},
		{"line break in payload", obj(member("payloadType", pt), member("payload", q(pStr[:4]+"\n"+pStr[4:])), member("signatures", sigs)), true},
		{"wrong padding", obj(member("payloadType", pt), member("payload", q(badPadding)), member("signatures", sigs)), true},
		{"invalid UTF-8 in an unknown member", obj(member("payloadType", pt), member("payload", p), member("signatures", sigs), `"x":"`+"\xff"+`"`), true},
		{"payload null", obj(member("payloadType", pt), member("payload", "null"), member("signatures", sigs)), false},
		{"payloadType null", obj(member("payloadType", "null"), member("payload", p), member("signatures", sigs)), false},
		{"sig a number", withSig(member("keyid", keyID), member("sig", "0")), false},
		{"signatures an object", obj(member("payloadType", pt), member("payload", p), member("signatures", `{"sig":`+q(sigB64)+`}`)), false},
		{"no signature", obj(member("payloadType", pt), member("payload", p), member("signatures", `[]`)), false},
		{"an array", []byte(`[` + string(good) + `]`), false},
	}
	if mixed, ok := mix(pStr); ok {
		cases = append(cases, differentialCase{"mixed alphabets in payload", obj(member("payloadType", pt), member("payload", q(mixed)), member("signatures", sigs)), true})
	} else if payloadType == testType {
		t.Fatalf("the test payload's base64 %q has fewer than two characters that differ between the alphabets", pStr)
	}
	if mixed, ok := mix(sigB64); ok {
		cases = append(cases, differentialCase{"mixed alphabets in sig", withSig(member("keyid", keyID), member("sig", q(mixed))), true})
	}
	// Base64 whose last character before the padding has bits that decode to nothing.
	if i := strings.IndexByte(pStr, '=') - 1; i >= 0 {
		const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
		loose := pStr[:i] + string(alphabet[strings.IndexByte(alphabet, pStr[i])+1]) + pStr[i+1:]
		cases = append(cases, differentialCase{"non-zero bits after the last byte", obj(member("payloadType", pt), member("payload", q(loose)), member("signatures", sigs)), true})
	}
	return cases
}

// TestDifferential checks that Lethe refuses, for each kind of envelope, every envelope that
// decoders read differently, and records which of them the reference verifier accepts: an
// envelope both accept must mean the same to both, so these cannot be accepted by Lethe.
func TestDifferential(t *testing.T) {
	pub, _ := testKey(1)
	for kind, k := range lethePayloads(t) {
		for _, tc := range differentialCasesFor(t, k.payloadType, k.payload) {
			t.Run(kind+"/"+tc.name, func(t *testing.T) {
				if _, err := k.verify(tc.envelope, pub); err == nil {
					t.Errorf("Lethe accepts %s", tc.envelope)
				} else if !errors.Is(err, dsse.ErrMalformed) {
					t.Errorf("Lethe's error %v does not wrap dsse.ErrMalformed", err)
				}
				env, err := refParse(tc.envelope)
				if got := err == nil && refVerify(env, k.payloadType, pub); got != tc.refAccepts {
					t.Errorf("the reference verifier accepts: %v, want %v (%v)", got, tc.refAccepts, err)
				}
			})
		}
	}
}

// TestPayloadAttack shows the envelope that made this package necessary: the signed payload
// under "Payload", another under "payload". Decoded with encoding/json (Lethe's decoder before
// package dsse), the signature verifies over the signed payload; a DSSE verifier reads the
// other one and refuses; Lethe refuses to decode it.
func TestPayloadAttack(t *testing.T) {
	pub, _ := testKey(1)
	attack := differentialCases(t)[0]
	var lenient struct {
		PayloadType string `json:"payloadType"`
		Payload     []byte `json:"payload"`
		Signatures  []struct {
			Sig []byte `json:"sig"`
		} `json:"signatures"`
	}
	if err := json.Unmarshal(attack.envelope, &lenient); err != nil {
		t.Fatal(err)
	}
	if !ed25519.Verify(pub, refPAE(lenient.PayloadType, lenient.Payload), lenient.Signatures[0].Sig) {
		t.Fatal("the attack envelope does not verify when read with encoding/json; it tests nothing")
	}
	if env, err := refParse(attack.envelope); err != nil || refVerify(env, testType, pub) {
		t.Fatalf("the reference verifier accepts the attack envelope (%v)", err)
	}
	if _, err := dsse.Parse(attack.envelope, 1<<20); !errors.Is(err, dsse.ErrMalformed) {
		t.Fatalf("Parse = %v, want ErrMalformed", err)
	}
}
