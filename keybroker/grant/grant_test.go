package grant_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/dsse"
	"github.com/lethe-cc/lethe/keybroker/grant"
)

var (
	kbPub, kbKey = mustKey()
	_, otherKey  = mustKey()
)

func mustKey() (ed25519.PublicKey, ed25519.PrivateKey) {
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return pub, key
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// fixture is one genuine release: what each agent knows, and the grant the keybroker signed.
type fixture struct {
	srcKey, dstKey       []byte
	srcNonce, dstNonce   []byte
	srcSealed, dstSealed []byte
}

func newFixture() *fixture {
	return &fixture{
		srcKey: random(1216), dstKey: random(1216),
		srcNonce: random(32), dstNonce: random(32),
		srcSealed: random(200), dstSealed: random(230),
	}
}

func digest(b []byte) []byte { d := sha256.Sum256(b); return d[:] }

func (f *fixture) grant() *grant.Grant {
	return &grant.Grant{
		Kind: grant.Kind, Op: grant.OpRelease, MigrationID: "m-1", Tenant: "acme", VM: "web",
		FromEpoch: 3, ToEpoch: 4, DataEndpoint: "10.0.0.2:4711", PolicyDigest: random(32), PolicySVN: 7,
		IssuedAt: time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC),
		Source:   &grant.End{Host: "host-a", EvidenceDigest: random(32), HPKEPublicKey: f.srcKey, Nonce: f.srcNonce, SealedDigest: digest(f.srcSealed)},
		Destination: &grant.End{Host: "host-b", EvidenceDigest: random(32), HPKEPublicKey: f.dstKey, Nonce: f.dstNonce,
			SealedDigest: digest(f.dstSealed)},
	}
}

func (f *fixture) source() grant.Expectation {
	return grant.Expectation{
		Op: grant.OpRelease, MigrationID: "m-1", Role: attest.RoleSource, Tenant: "acme", VM: "web", Host: "host-a",
		HPKEPublicKey: f.srcKey, Nonce: f.srcNonce, Sealed: f.srcSealed, Epoch: 3,
	}
}

func (f *fixture) destination() grant.Expectation {
	return grant.Expectation{
		Op: grant.OpRelease, MigrationID: "m-1", Role: attest.RoleDestination, Tenant: "acme", VM: "web", Host: "host-b",
		HPKEPublicKey: f.dstKey, Nonce: f.dstNonce, Sealed: f.dstSealed,
	}
}

func sign(t *testing.T, g *grant.Grant, key ed25519.PrivateKey) []byte {
	t.Helper()
	b, err := grant.Sign(g, key.Public().(ed25519.PublicKey), func(msg []byte) ([]byte, error) { return ed25519.Sign(key, msg), nil })
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCheckAcceptsGenuineGrants(t *testing.T) {
	f := newFixture()
	env := sign(t, f.grant(), kbKey)
	for name, want := range map[string]grant.Expectation{"source": f.source(), "destination": f.destination()} {
		t.Run(name, func(t *testing.T) {
			g, err := grant.Check(env, kbPub, want)
			if err != nil {
				t.Fatal(err)
			}
			if g.DataEndpoint != "10.0.0.2:4711" || g.ToEpoch != 4 {
				t.Errorf("grant %+v", g)
			}
			if !bytes.Equal(g.Source.HPKEPublicKey, f.srcKey) || !bytes.Equal(g.Destination.HPKEPublicKey, f.dstKey) {
				t.Error("the grant Check returned names other HPKE keys than the one signed")
			}
		})
	}
	adopt := &grant.Grant{
		Kind: grant.Kind, Op: grant.OpAdopt, MigrationID: "adopt-1", Tenant: "acme", VM: "web", ToEpoch: 1,
		Destination: &grant.End{Host: "host-a", HPKEPublicKey: f.srcKey, Nonce: f.srcNonce, SealedDigest: digest(f.srcSealed)},
	}
	want := grant.Expectation{Op: grant.OpAdopt, MigrationID: "adopt-1", Role: attest.RoleAdopt, Tenant: "acme", VM: "web", Host: "host-a", HPKEPublicKey: f.srcKey, Nonce: f.srcNonce, Sealed: f.srcSealed}
	if _, err := grant.Check(sign(t, adopt, kbKey), kbPub, want); err != nil {
		t.Errorf("adoption: %v", err)
	}
	reissue := *adopt
	reissue.Op, reissue.FromEpoch, reissue.ToEpoch = grant.OpReissue, 5, 5
	want.Op = grant.OpReissue
	if _, err := grant.Check(sign(t, &reissue, kbKey), kbPub, want); err != nil {
		t.Errorf("reissue: %v", err)
	}
}

// TestCheckRefuses covers every refusal of a grant: whoever made it, whatever it names.
func TestCheckRefuses(t *testing.T) {
	f := newFixture()
	tests := map[string]struct {
		envelope func(t *testing.T) []byte
		want     func() grant.Expectation
		reason   string
		// wantErr, if not nil, is an error the refusal must wrap besides ErrRefused.
		wantErr error
	}{
		"no grant": {
			envelope: func(*testing.T) []byte { return nil },
			want:     f.source, reason: "malformed",
		},
		"signed by another key (the broker's)": {
			envelope: func(t *testing.T) []byte { return sign(t, f.grant(), otherKey) },
			want:     f.source, reason: "not signed by the pinned keybroker key", wantErr: dsse.ErrSignature,
		},
		"unsigned": {
			envelope: func(t *testing.T) []byte {
				p, _ := json.Marshal(f.grant())
				b, _ := json.Marshal(map[string]any{"payloadType": grant.PayloadType, "payload": p, "signatures": []any{}})
				return b
			},
			want: f.source, reason: "signatures",
		},
		"signed payload of another type (a receipt)": {
			envelope: func(t *testing.T) []byte {
				p, _ := json.Marshal(f.grant())
				env, err := dsse.Sign("application/vnd.lethe.receipt+json", p, kbPub, func(m []byte) ([]byte, error) { return ed25519.Sign(kbKey, m), nil })
				if err != nil {
					t.Fatal(err)
				}
				b, _ := json.Marshal(env)
				return b
			},
			want: f.source, reason: "not a grant's", wantErr: dsse.ErrMalformed,
		},
		"unsigned second payload beside the signed one": {
			envelope: func(t *testing.T) []byte {
				var m map[string]any
				json.Unmarshal(sign(t, f.grant(), kbKey), &m)
				evil := f.grant()
				evil.DataEndpoint = "203.0.113.9:1"
				p, _ := json.Marshal(evil)
				m["Payload"] = p
				b, _ := json.Marshal(m)
				return b
			},
			want: f.source, reason: "",
		},
		"another migration": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.MigrationID = "m-2"; return sign(t, g, kbKey) },
			want:     f.source, reason: "names migration",
		},
		"another guest": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.VM = "db"; return sign(t, g, kbKey) },
			want:     f.source, reason: "names guest",
		},
		"another tenant": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.Tenant = "evil"; return sign(t, g, kbKey) },
			want:     f.destination, reason: "names guest",
		},
		"an adoption grant for a migration": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.Op = grant.OpAdopt; return sign(t, g, kbKey) },
			want:     f.source, reason: "grant for",
		},
		"a release grant for an adoption": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.MigrationID = "m-1"; return sign(t, g, kbKey) },
			want: func() grant.Expectation {
				w := f.destination()
				w.Op, w.Role = grant.OpRelease, attest.RoleAdopt
				return w
			},
			reason: "does not take part",
		},
		"another host": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.Source.Host = "host-z"; return sign(t, g, kbKey) },
			want:     f.source, reason: "for host",
		},
		"another HPKE key for this end": {
			envelope: func(t *testing.T) []byte {
				g := f.grant()
				g.Destination.HPKEPublicKey = random(1216)
				return sign(t, g, kbKey)
			},
			want: f.destination, reason: "another HPKE key",
		},
		"another nonce": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.Source.Nonce = random(32); return sign(t, g, kbKey) },
			want:     f.source, reason: "another nonce",
		},
		"other sealed keys than those delivered": {
			envelope: func(t *testing.T) []byte { return sign(t, f.grant(), kbKey) },
			want: func() grant.Expectation {
				w := f.source()
				w.Sealed = random(200)
				return w
			},
			reason: "not the ones the grant names",
		},
		"no source in a release": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.Source = nil; return sign(t, g, kbKey) },
			want:     f.destination, reason: "names no source",
		},
		"the role's end missing": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.Source = nil; return sign(t, g, kbKey) },
			want:     f.source, reason: "names no source",
		},
		"epochs that do not follow": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.ToEpoch = 9; return sign(t, g, kbKey) },
			want:     f.destination, reason: "epochs",
		},
		"another epoch than the source's": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.FromEpoch, g.ToEpoch = 1, 2; return sign(t, g, kbKey) },
			want:     f.source, reason: "it is in epoch 3 here",
		},
		"no data endpoint": {
			envelope: func(t *testing.T) []byte { g := f.grant(); g.DataEndpoint = ""; return sign(t, g, kbKey) },
			want:     f.source, reason: "no data endpoint",
		},
		"one HPKE key for both ends": {
			envelope: func(t *testing.T) []byte {
				g := f.grant()
				g.Destination.HPKEPublicKey = f.srcKey
				return sign(t, g, kbKey)
			},
			want: f.source, reason: "one HPKE key for both ends",
		},
		"an adoption of another epoch than 1": {
			envelope: func(t *testing.T) []byte {
				return sign(t, &grant.Grant{Kind: grant.Kind, Op: grant.OpAdopt, MigrationID: "m-1", Tenant: "acme", VM: "web", ToEpoch: 2,
					Destination: &grant.End{Host: "host-b", HPKEPublicKey: f.dstKey, Nonce: f.dstNonce, SealedDigest: digest(f.dstSealed)}}, kbKey)
			},
			want: func() grant.Expectation {
				w := f.destination()
				w.Op, w.Role = grant.OpAdopt, attest.RoleAdopt
				return w
			},
			reason: "adoption grant for epochs",
		},
		"another kind of document": {
			envelope: func(t *testing.T) []byte {
				p, _ := json.Marshal(map[string]any{"kind": "lethe.dev/v1/ErasureReceipt", "destination": map[string]any{}})
				env, err := dsse.Sign(grant.PayloadType, p, kbPub, func(m []byte) ([]byte, error) { return ed25519.Sign(kbKey, m), nil })
				if err != nil {
					t.Fatal(err)
				}
				b, _ := json.Marshal(env)
				return b
			},
			want: f.source, reason: "",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := grant.Check(tc.envelope(t), kbPub, tc.want())
			if err == nil {
				t.Fatal("Check accepted the grant")
			}
			if !errors.Is(err, grant.ErrRefused) {
				t.Errorf("error %v does not wrap ErrRefused", err)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q does not say %q", err, tc.reason)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("error %v does not wrap %v", err, tc.wantErr)
			}
			if tc.wantErr != dsse.ErrSignature && errors.Is(err, dsse.ErrSignature) {
				t.Errorf("error %v blames the signature", err)
			}
		})
	}
}

func TestNewEnd(t *testing.T) {
	ev := &attest.Evidence{Platform: attest.PlatformEmulatedSEVSNP, Raw: random(1184), HPKEPublicKey: random(1216)}
	nonce, sealed := random(32), random(200)
	got := grant.NewEnd("host-a", ev, nonce, sealed)
	want := &grant.End{Host: "host-a", EvidenceDigest: digest(ev.Raw), HPKEPublicKey: ev.HPKEPublicKey, Nonce: nonce, SealedDigest: digest(sealed)}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("NewEnd (-want +got):\n%s", diff)
	}
}

func TestCommitAck(t *testing.T) {
	tk := random(32)
	transcript := random(32)
	mac, err := grant.CommitMAC(tk, "m-1", transcript)
	if err != nil {
		t.Fatal(err)
	}
	good := grant.CommitAck{MigrationID: "m-1", Transcript: transcript, MAC: mac}
	b, _ := json.Marshal(good)
	ack, err := grant.ParseCommitAck(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := ack.Verify(tk, "m-1"); err != nil {
		t.Fatalf("a genuine acknowledgement: %v", err)
	}
	flipped := append([]byte(nil), mac...)
	flipped[0] ^= 1
	tests := map[string]struct {
		ack grant.CommitAck
		tk  []byte
		id  string
	}{
		"wrong MAC":          {grant.CommitAck{MigrationID: "m-1", Transcript: transcript, MAC: flipped}, tk, "m-1"},
		"another TK":         {good, random(32), "m-1"},
		"another migration":  {good, tk, "m-2"},
		"short transcript":   {grant.CommitAck{MigrationID: "m-1", Transcript: transcript[:16], MAC: mac}, tk, "m-1"},
		"no MAC":             {grant.CommitAck{MigrationID: "m-1", Transcript: transcript}, tk, "m-1"},
		"another transcript": {grant.CommitAck{MigrationID: "m-1", Transcript: random(32), MAC: mac}, tk, "m-1"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if err := tc.ack.Verify(tc.tk, tc.id); !errors.Is(err, grant.ErrCommitAck) {
				t.Errorf("Verify = %v, want ErrCommitAck", err)
			}
		})
	}
	for name, b := range map[string][]byte{"empty": nil, "not JSON": []byte("{"), "unknown field": []byte(`{"migrationId":"m-1","extra":1}`), "too large": make([]byte, grant.MaxCommitAck+1)} {
		if _, err := grant.ParseCommitAck(b); !errors.Is(err, grant.ErrCommitAck) {
			t.Errorf("ParseCommitAck(%s) = %v, want ErrCommitAck", name, err)
		}
	}
}

func FuzzVerify(f *testing.F) {
	fx := newFixture()
	p, _ := json.Marshal(fx.grant())
	env, _ := dsse.Sign(grant.PayloadType, p, kbPub, func(m []byte) ([]byte, error) { return ed25519.Sign(kbKey, m), nil })
	b, _ := json.Marshal(env)
	f.Add(b)
	f.Add([]byte(`{"payloadType":"x","payload":"","signatures":[{"sig":""}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := grant.Verify(b, kbPub)
		if err == nil && g.Destination == nil {
			t.Fatal("a grant without a destination verified")
		}
	})
}
