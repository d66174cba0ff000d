package receipt

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func testReceipt() *Receipt {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	return &Receipt{
		Kind: Kind, MigrationID: "m1", Tenant: "demo", VM: "vm1", Outcome: OutcomeErased,
		Policy:      PolicyRef{Digest: make([]byte, 32), SVN: 3},
		Source:      EndClaims{Platform: "emulated-sev-snp", EvidenceDigest: make([]byte, 32), TCB: "bl=3,tee=0,snp=8,ucode=115"},
		Destination: EndClaims{Platform: "emulated-sev-snp", EvidenceDigest: make([]byte, 32)},
		CleanMemory: json.RawMessage(`{"bytes":1,"type":"lethe.dev/clean-memory/v1","verifiedZero":true,"zeroed":true}`),
		Erasure: &ErasureEvidence{
			EndClaims: EndClaims{Platform: "emulated-sev-snp", EvidenceDigest: make([]byte, 32), TCB: "bl=3,tee=0,snp=8,ucode=115"},
			Statement: json.RawMessage(`{"keysZeroized":["tk","mdk","hpke"],"migrationId":"m1","type":"lethe.dev/erasure/v1"}`),
			Accepted:  true,
		},
		FromEpoch: 1, ToEpoch: 2,
		DestroyedKeys: []DestroyedKey{{Name: "lethe-mig-m1", LatestVersion: 1, DestroyedAt: at}, {Name: "lethe-demo-vm1-e1", LatestVersion: 1, DestroyedAt: at}},
		EndedAt:       at, IssuedAt: at.Add(time.Second),
	}
}

func signed(t testing.TB) (*Envelope, ed25519.PublicKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	env, err := Sign(testReceipt(), pub, func(msg []byte) ([]byte, error) { return ed25519.Sign(priv, msg), nil })
	if err != nil {
		t.Fatal(err)
	}
	return env, pub
}

func TestVerify(t *testing.T) {
	env, pub := signed(t)
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	tests := map[string]struct {
		edit func(*Envelope)
		pub  ed25519.PublicKey
		ok   bool
	}{
		"valid": {ok: true},
		"payload changed": {edit: func(e *Envelope) {
			var r Receipt
			json.Unmarshal(e.Payload, &r)
			r.Outcome = OutcomeAborted
			e.Payload, _ = json.Marshal(r)
		}},
		"payload type changed": {edit: func(e *Envelope) { e.PayloadType = "application/json" }},
		"signature flipped":    {edit: func(e *Envelope) { e.Signatures[0].Sig[0] ^= 1 }},
		"no signature":         {edit: func(e *Envelope) { e.Signatures = nil }},
		"another key":          {pub: other},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			b, _ := json.Marshal(env)
			e, err := Parse(b)
			if err != nil {
				t.Fatal(err)
			}
			if tt.edit != nil {
				tt.edit(e)
			}
			k := pub
			if tt.pub != nil {
				k = tt.pub
			}
			r, err := Verify(e, k)
			if !tt.ok {
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("Verify = %v, want ErrInvalid", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(testReceipt(), r); diff != "" {
				t.Errorf("receipt (-want +got):\n%s", diff)
			}
		})
	}
}

func TestPublicKeyPEM(t *testing.T) {
	_, pub := signed(t)
	b, err := MarshalPublicKeyPEM(pub)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParsePublicKeyPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equal(pub) {
		t.Errorf("PEM round trip changed the key")
	}
}

func FuzzVerify(f *testing.F) {
	env, pub := signed(f)
	b, _ := json.Marshal(env)
	f.Add(b)
	f.Add([]byte(`{"payloadType":"application/vnd.lethe.receipt+json","payload":"e30=","signatures":[]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := Parse(b)
		if err != nil {
			return
		}
		e.Decode()
		if r, err := Verify(e, pub); err == nil {
			if err := r.Validate(); err != nil {
				t.Fatalf("Verify accepted an invalid receipt: %v", err)
			}
		}
	})
}
