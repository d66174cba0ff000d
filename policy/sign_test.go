package policy

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/internal/dsse"
)

func newKey(t testing.TB) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv
}

func signed(t testing.TB, priv ed25519.PrivateKey, src string) []byte {
	t.Helper()
	env, err := Sign("p.yaml", []byte(src), priv)
	if err != nil {
		t.Fatal(err)
	}
	b, err := env.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSignVerify(t *testing.T) {
	pub, priv := newKey(t)
	b := signed(t, priv, minimal)
	p, err := Verify(b, pub)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p.Raw(), []byte(minimal)) {
		t.Errorf("payload %q, want the exact bytes signed", p.Raw())
	}
	env, err := ParseEnvelope(b)
	if err != nil {
		t.Fatal(err)
	}
	if env.PayloadType != PayloadType || env.Signatures[0].KeyID != KeyID(pub) {
		t.Errorf("envelope %+v", env)
	}
	if !ed25519.Verify(pub, []byte(fmt.Sprintf("DSSEv1 33 application/vnd.lethe.policy+yaml %d %s", len(minimal), minimal)), env.Signatures[0].Sig) {
		t.Error("signature is not over DSSE's PAE")
	}
}

func TestVerifyRejects(t *testing.T) {
	pub, priv := newKey(t)
	otherPub, otherPriv := newKey(t)
	good := signed(t, priv, minimal)
	mutate := func(f func(*Envelope)) []byte {
		var env Envelope
		if err := json.Unmarshal(good, &env); err != nil {
			t.Fatal(err)
		}
		f(&env)
		b, err := json.Marshal(env)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tests := []struct {
		name    string
		signed  []byte
		pub     ed25519.PublicKey
		wantSig bool // want ErrSignature
	}{
		{"tampered payload", mutate(func(e *Envelope) {
			e.Payload = bytes.Replace(e.Payload, []byte("policySvn: 4"), []byte("policySvn: 9"), 1)
		}), pub, true},
		{"tampered signature", mutate(func(e *Envelope) { e.Signatures[0].Sig[0] ^= 1 }), pub, true},
		{"wrong key", good, otherPub, true},
		{"signed by another key with our key id", mutate(func(e *Envelope) {
			e.Signatures[0].Sig = ed25519.Sign(otherPriv, dsse.PAE(PayloadType, e.Payload))
		}), pub, true},
		{"payload type changed", mutate(func(e *Envelope) { e.PayloadType = "application/json" }), pub, false},
		{"no signatures", mutate(func(e *Envelope) { e.Signatures = nil }), pub, false},
		{"unsigned payload beside the signed one", bytes.Replace(good, []byte(`"payloadType"`), []byte(`"Payload": "", "payloadType"`), 1), pub, false},
		{"not json", []byte("apiVersion: lethe.dev/v1"), pub, false},
		{"short key", good, pub[:10], false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Verify(tc.signed, tc.pub)
			if err == nil {
				t.Fatalf("verified: %+v", p.Metadata)
			}
			if got := errors.Is(err, ErrSignature); got != tc.wantSig {
				t.Errorf("errors.Is(%v, ErrSignature) = %v, want %v", err, got, tc.wantSig)
			}
		})
	}
}

// TestParseEnvelopeDSSE checks that a signed policy decodes as DSSE says: unknown members
// ignored, base64 standard or URL-safe, padded or not; and that names spelled in another case
// are refused rather than read (package dsse has the whole list).
func TestParseEnvelopeDSSE(t *testing.T) {
	pub, priv := newKey(t)
	env, err := Sign("p.yaml", []byte(minimal), priv)
	if err != nil {
		t.Fatal(err)
	}
	sig := env.Signatures[0].Sig
	envelope := func(enc *base64.Encoding, extra string) []byte {
		return fmt.Appendf(nil, `{%s"payloadType":%q,"payload":%q,"signatures":[{"keyid":%q,"sig":%q}]}`,
			extra, PayloadType, enc.EncodeToString(env.Payload), KeyID(pub), enc.EncodeToString(sig))
	}
	tests := map[string]struct {
		signed []byte
		ok     bool
	}{
		"standard base64":           {envelope(base64.StdEncoding, ""), true},
		"standard base64, no pad":   {envelope(base64.RawStdEncoding, ""), true},
		"URL-safe base64":           {envelope(base64.URLEncoding, ""), true},
		"URL-safe base64, no pad":   {envelope(base64.RawURLEncoding, ""), true},
		"unknown member":            {envelope(base64.StdEncoding, `"extra":{"a":[1]},`), true},
		"Payload beside payload":    {envelope(base64.StdEncoding, `"Payload":"",`), false},
		"payloadType twice":         {envelope(base64.StdEncoding, fmt.Sprintf(`"payloadType":%q,`, PayloadType)), false},
		"payload type not policy":   {[]byte(strings.Replace(string(envelope(base64.StdEncoding, "")), PayloadType, "application/json", 1)), false},
		"trailing data":             {append(envelope(base64.StdEncoding, ""), 'x'), false},
		"larger than twice MaxSize": {append(envelope(base64.StdEncoding, ""), bytes.Repeat([]byte(" "), 2*MaxSize)...), false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			p, err := Verify(tc.signed, pub)
			if tc.ok {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if !bytes.Equal(p.Raw(), []byte(minimal)) {
					t.Errorf("payload %q, want the bytes signed", p.Raw())
				}
				return
			}
			if err == nil {
				t.Fatal("verified")
			}
			if errors.Is(err, ErrSignature) {
				t.Errorf("Verify = %v, want a decoding error, not ErrSignature", err)
			}
		})
	}
}

func TestVerifySignedInvalidPolicy(t *testing.T) {
	// Sign refuses an invalid policy; one signed by other means is still refused on Verify.
	pub, priv := newKey(t)
	bad := []byte(minimal + "spec:\n  bogus: 1\n")
	if _, err := Sign("bad.yaml", bad, priv); len(ParseErrors(err)) != 1 {
		t.Fatalf("Sign of an invalid policy: %v", err)
	}
	env := Envelope{PayloadType: PayloadType, Payload: bad, Signatures: []Signature{{Sig: ed25519.Sign(priv, dsse.PAE(PayloadType, bad))}}}
	b, _ := json.Marshal(env)
	if _, err := Verify(b, pub); len(ParseErrors(err)) != 1 {
		t.Errorf("Verify of a signed invalid policy: %v", err)
	}
}

func TestCheckRollback(t *testing.T) {
	p, err := Parse("p.yaml", []byte(minimal)) // policySvn 4
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		last uint64
		want bool // want ErrRollback
	}{{0, false}, {3, false}, {4, false}, {5, true}, {1 << 63, true}}
	for _, tc := range tests {
		err := CheckRollback(p, tc.last)
		if got := errors.Is(err, ErrRollback); got != tc.want {
			t.Errorf("CheckRollback(svn 4, last %d) = %v, want rollback %v", tc.last, err, tc.want)
		}
	}
}

func TestGenerateKey(t *testing.T) {
	dir := t.TempDir()
	pub, err := GenerateKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, PrivateKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s mode %v, want 0600", PrivateKeyFile, fi.Mode().Perm())
	}
	priv, err := ReadPrivateKey(filepath.Join(dir, PrivateKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	readPub, err := ReadPublicKey(filepath.Join(dir, PublicKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if !pub.Equal(readPub) || !pub.Equal(priv.Public()) {
		t.Error("key files do not hold the generated pair")
	}
	if _, err := GenerateKey(dir); err == nil {
		t.Error("GenerateKey overwrote an existing key")
	}
	if _, err := ParsePublicKey([]byte("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")); err == nil {
		t.Error("parsed a private key block as a public key")
	}
}

// FuzzParseEnvelope feeds the envelope decoder and Verify arbitrary bytes: never a panic, and
// never a verified policy without the key's signature.
func FuzzParseEnvelope(f *testing.F) {
	pub, priv := newKey(f)
	f.Add(signed(f, priv, minimal))
	f.Add([]byte(`{"payloadType":"application/vnd.lethe.policy+yaml","payload":"","signatures":[{"sig":""}]}`))
	f.Add([]byte(`{"payloadType":1}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		env, err := ParseEnvelope(b)
		if err != nil {
			return
		}
		p, err := env.Verify(pub)
		if err != nil {
			return
		}
		ok := false
		for _, s := range env.Signatures {
			ok = ok || ed25519.Verify(pub, dsse.PAE(PayloadType, env.Payload), s.Sig)
		}
		if !ok || !bytes.Equal(p.Raw(), env.Payload) {
			t.Fatal("verified without a valid signature")
		}
	})
}
