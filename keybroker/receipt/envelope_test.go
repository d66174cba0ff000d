package receipt

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/internal/dsse"
)

// TestEnvelopeDSSE checks what receipts take from package dsse: "sha256:" key IDs, strict
// decoding by Parse and inside other JSON documents, and key IDs that do not decide.
func TestEnvelopeDSSE(t *testing.T) {
	env, pub := signed(t)
	if got, want := env.Signatures[0].KeyID, dsse.KeyID(pub); got != want || !strings.HasPrefix(got, "sha256:") {
		t.Errorf("key id %q, want %q", got, want)
	}
	b, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	// The attack: the signed receipt under "Payload", which encoding/json reads (the last of
	// the names it folds together), and another under "payload", which DSSE verifiers read.
	other := base64.StdEncoding.EncodeToString([]byte(`{"kind":"x"}`))
	attack := bytes.Replace(b, []byte(`"payload":`), []byte(`"payload":"`+other+`","Payload":`), 1)
	if _, err := Parse(attack); !errors.Is(err, ErrInvalid) || !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("Parse(Payload beside payload) = %v, want ErrInvalid and dsse.ErrMalformed", err)
	}
	// Embedded in a response decoded with encoding/json, the envelope decodes as strictly.
	var resp struct {
		Receipt *Envelope `json:"receipt"`
	}
	if err := json.Unmarshal([]byte(`{"receipt":`+string(attack)+`}`), &resp); !errors.Is(err, dsse.ErrMalformed) {
		t.Errorf("json.Unmarshal(response with the attack) = %v, want dsse.ErrMalformed", err)
	}
	if err := json.Unmarshal([]byte(`{"receipt":`+string(b)+`}`), &resp); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(resp.Receipt, pub); err != nil {
		t.Errorf("Verify(embedded receipt) = %v", err)
	}
	if err := json.Unmarshal([]byte(`{"receipt":null}`), &resp); err != nil || resp.Receipt != nil {
		t.Errorf("json.Unmarshal(null receipt) = %v, %v; want nil, nil", resp.Receipt, err)
	}
	// A receipt signed before key IDs took the "sha256:" prefix still verifies: the key ID is
	// a hint.
	old := *env
	old.Signatures = []Signature{{KeyID: strings.TrimPrefix(env.Signatures[0].KeyID, "sha256:"), Sig: env.Signatures[0].Sig}}
	if _, err := Verify(&old, pub); err != nil {
		t.Errorf("Verify(receipt with a bare hex key id) = %v", err)
	}
}
