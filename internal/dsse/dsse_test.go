package dsse_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/lethe-cc/lethe/internal/dsse"
)

const testType = "application/vnd.lethe.test+json"

// testKey returns a fixed Ed25519 key pair (seed byte n), so that signatures, and so their
// base64, are the same on every run.
func testKey(n byte) (ed25519.PublicKey, ed25519.PrivateKey) {
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{n}, ed25519.SeedSize))
	return priv.Public().(ed25519.PublicKey), priv
}

func signer(priv ed25519.PrivateKey) func([]byte) ([]byte, error) {
	return func(msg []byte) ([]byte, error) { return ed25519.Sign(priv, msg), nil }
}

func TestPAE(t *testing.T) {
	// The DSSE specification's test vector (protocol.md).
	got := string(dsse.PAE("http://example.com/HelloWorld", []byte("hello world")))
	if want := "DSSEv1 29 http://example.com/HelloWorld 11 hello world"; got != want {
		t.Errorf("PAE = %q, want %q", got, want)
	}
	if got, want := string(dsse.PAE("", nil)), "DSSEv1 0  0 "; got != want {
		t.Errorf("PAE of nothing = %q, want %q", got, want)
	}
}

func TestKeyID(t *testing.T) {
	pub, _ := testKey(1)
	if got, want := dsse.KeyID(pub), refKeyID(pub); got != want {
		t.Errorf("KeyID = %q, want %q", got, want)
	}
	if got := dsse.KeyID(pub[:5]); got != "" {
		t.Errorf("KeyID of a short key = %q, want empty", got)
	}
}

func TestSignVerify(t *testing.T) {
	pub, priv := testKey(1)
	otherPub, otherPriv := testKey(2)
	payload := []byte(`{"a":1}`)
	env, err := dsse.Sign(testType, payload, pub, signer(priv))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := env.Verify(testType, pub); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("Verify = %q, %v; want the payload", got, err)
	}
	if _, err := env.Verify(testType, otherPub); !errors.Is(err, dsse.ErrSignature) {
		t.Errorf("Verify with another key = %v, want ErrSignature", err)
	}
	if _, err := env.Verify("application/json", pub); !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("Verify for another payload type = %v, want ErrMalformed", err)
	}
	if _, err := env.Verify(testType, pub[:5]); err == nil || errors.Is(err, dsse.ErrSignature) {
		t.Errorf("Verify with a short key = %v, want an error that is not ErrSignature", err)
	}
	if _, err := dsse.Sign(testType, payload, pub, signer(otherPriv)); err == nil {
		t.Error("Sign accepted a signature by another key than the one named")
	}
	if _, err := dsse.Sign(testType, payload, pub, func([]byte) ([]byte, error) { return nil, errors.New("vault down") }); err == nil || !strings.Contains(err.Error(), "vault down") {
		t.Errorf("Sign with a failing signer = %v", err)
	}
	// The key ID is a hint: a wrong one does not stop a good signature.
	env.Signatures[0].KeyID = "sha256:00"
	if _, err := env.Verify(testType, pub); err != nil {
		t.Errorf("Verify with a wrong key id = %v", err)
	}
}

func TestParseLimits(t *testing.T) {
	pub, priv := testKey(1)
	env, err := dsse.Sign(testType, []byte("x"), pub, signer(priv))
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dsse.Parse(b, len(b)); err != nil {
		t.Errorf("Parse at the size limit: %v", err)
	}
	if _, err := dsse.Parse(b, len(b)-1); !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("Parse over the size limit = %v, want ErrMalformed", err)
	}
	sig := env.Signatures[0]
	for _, n := range []int{dsse.MaxSignatures, dsse.MaxSignatures + 1} {
		env.Signatures = make([]dsse.Signature, n)
		for i := range env.Signatures {
			env.Signatures[i] = sig
		}
		b, _ := json.Marshal(env)
		_, err := dsse.Parse(b, 1<<20)
		if ok := n <= dsse.MaxSignatures; (err == nil) != ok {
			t.Errorf("Parse of %d signatures = %v, want ok %v", n, err, ok)
		}
	}
}

// TestUnmarshalJSON checks that an envelope inside another JSON document decodes as
// strictly as Parse decodes it, and that null keeps encoding/json's meaning.
func TestUnmarshalJSON(t *testing.T) {
	good := refEncode(t, testType, []byte("hi"), refOptions{})
	var resp struct {
		Envelope *dsse.Envelope `json:"envelope"`
	}
	if err := json.Unmarshal(fmtJSON(`{"envelope":%s}`, good), &resp); err != nil {
		t.Fatal(err)
	}
	if string(resp.Envelope.Payload) != "hi" {
		t.Errorf("payload %q", resp.Envelope.Payload)
	}
	bad := bytes.Replace(good, []byte(`"payload"`), []byte(`"Payload":"aGk=","payload"`), 1)
	if err := json.Unmarshal(fmtJSON(`{"envelope":%s}`, bad), &resp); !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("Unmarshal of Payload beside payload = %v, want ErrMalformed", err)
	}
	resp.Envelope = nil
	if err := json.Unmarshal([]byte(`{"envelope":null}`), &resp); err != nil || resp.Envelope != nil {
		t.Errorf("Unmarshal of null = %v, %v; want nil, nil", resp.Envelope, err)
	}
	if _, err := dsse.Parse([]byte("null"), 100); !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("Parse(null) = %v, want ErrMalformed", err)
	}
	var sig dsse.Signature
	if err := json.Unmarshal([]byte(`{"sig":"AA==","Sig":"AQ=="}`), &sig); !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("Unmarshal of a signature with Sig beside sig = %v, want ErrMalformed", err)
	}
	if err := json.Unmarshal([]byte(`{"keyid":"k","sig":"AQ","x":1}`), &sig); err != nil || sig.KeyID != "k" || !bytes.Equal(sig.Sig, []byte{1}) {
		t.Errorf("Unmarshal of a signature = %+v, %v", sig, err)
	}
}

func fmtJSON(format string, env []byte) []byte {
	return []byte(strings.Replace(format, "%s", string(env), 1))
}

// FuzzParse checks Parse against the independent decoder of interop_test.go: whatever Parse
// accepts, the reference decoder accepts and reads the same way (the reverse does not hold:
// Parse refuses what decoders could disagree on), and it survives a round trip through
// encoding/json. Its seed corpus (valid envelopes in every base64 variant and every envelope
// TestDifferential refuses) runs with the normal tests.
func FuzzParse(f *testing.F) {
	pub, priv := testKey(1)
	for _, o := range refVariants() {
		f.Add(refEncode(f, testType, testPayload, o))
	}
	env, err := dsse.Sign(testType, testPayload, pub, signer(priv))
	if err != nil {
		f.Fatal(err)
	}
	b, err := json.Marshal(env)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	for _, tc := range differentialCases(f) {
		f.Add(tc.envelope)
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"payloadType":"t","payload":"","signatures":[{"sig":""}],"x":[{"y":1e400}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		env, err := dsse.Parse(b, 1<<16)
		if err != nil {
			if !errors.Is(err, dsse.ErrMalformed) {
				t.Fatalf("Parse error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if n := len(env.Signatures); n == 0 || n > dsse.MaxSignatures {
			t.Fatalf("Parse accepted %d signatures", n)
		}
		ref, err := refParse(b)
		if err != nil {
			t.Fatalf("Parse accepted what the reference decoder refuses (%v): %q", err, b)
		}
		if diff := cmp.Diff(ref.lethe(), env, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("Parse and the reference decoder disagree (-reference +Parse):\n%s", diff)
		}
		again, err := json.Marshal(env)
		if err != nil {
			t.Fatal(err)
		}
		env2, err := dsse.Parse(again, 1<<20)
		if err != nil {
			t.Fatalf("Parse of its own encoding %q: %v", again, err)
		}
		if diff := cmp.Diff(env, env2, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("round trip changed the envelope (-before +after):\n%s", diff)
		}
		if _, err := env.Verify(testType, pub); err == nil {
			if !refVerify(ref, testType, pub) {
				t.Fatal("Verify accepted what the reference verifier refuses")
			}
		}
	})
}
