// Package grant defines what the keybroker signs when it hands keys out, and what it takes
// back as proof that a migration committed.
//
// Sealing keys to an agent's HPKE key authenticates nothing: anyone who has seen the agent's
// evidence (the broker, NATS) holds its public key and can seal keys of its own choosing to
// it. So every release, adoption and reissue comes with a Grant: a statement in a DSSE
// envelope (payload type PayloadType) signed by the keybroker's key (the receipt-signing
// key in Vault Transit, which tenants and agents pin) naming the migration, the guest, the
// epochs, and for each end its host, the digest of its evidence, its HPKE public key, the
// nonce it attested with and the digest of the sealed blob made for it, and the destination's
// data endpoint. An agent accepts sealed keys only with a grant that Check accepts for what
// it knows itself (its migration, role, guest, host, HPKE key, nonce, the blob it was given),
// connects only to the endpoint the grant names, and in the data-plane handshake requires the
// peer to prove it holds the HPKE key the grant names for it.
//
// CommitAck is the destination's commit acknowledgement: a MAC under a key derived from the
// transfer key TK over the transfer's transcript. Only holders of TK (the two attested agents,
// and the keybroker, which unwraps TK from Vault) can make one, so the keybroker destroys the
// source's epoch key only for a commit that carries one that verifies.
//
// This package imports no Vault, NATS or network code: the in-TEE agent links it.
package grant

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/internal/dsse"
)

// PayloadType is the DSSE payload type of a grant.
const PayloadType = "application/vnd.lethe.grant+json"

// Kind is the value of Grant.Kind.
const Kind = "lethe.dev/v1/KeyGrant"

// MaxEnvelopeSize bounds a grant's envelope (two HPKE public keys and digests: a few KiB).
const MaxEnvelopeSize = 64 << 10

// ErrRefused is returned (wrapped) by Check for a grant that does not authorize what is
// asked; the message says which field did not match.
var ErrRefused = errors.New("key grant refused")

// Op is what a grant was issued for.
type Op string

// The operations that hand out keys.
const (
	// OpRelease: a migration's keys, TK to the source, TK and MDK_{ToEpoch} to the
	// destination.
	OpRelease Op = "release"
	// OpAdopt: MDK_1 of a guest's first residency, to the agent of the host it starts on.
	OpAdopt Op = "adopt"
	// OpReissue: the current epoch's MDK again, to an agent that restarted.
	OpReissue Op = "reissue"
)

// End is one agent a grant names.
type End struct {
	// Host is the agent's host, as the broker registered it.
	Host string `json:"host"`
	// EvidenceDigest is the SHA-256 of the agent's evidence the keybroker verified.
	EvidenceDigest attest.HexBytes `json:"evidenceDigest"`
	// HPKEPublicKey is the ephemeral key that evidence binds, the one the keys are sealed to
	// and the one the agent must prove it holds in the data-plane handshake.
	HPKEPublicKey []byte `json:"hpkePublicKey"`
	// Nonce is the keybroker's nonce the evidence was bound to.
	Nonce attest.HexBytes `json:"nonce"`
	// SealedDigest is the SHA-256 of the sealed key blob made for this end.
	SealedDigest attest.HexBytes `json:"sealedDigest"`
}

// NewEnd names one agent in a grant: its host, the digest and HPKE key of its evidence ev
// (which the caller has verified), the nonce ev was bound to, and the digest of sealed, the
// key blob made for it.
func NewEnd(host string, ev *attest.Evidence, nonce, sealed []byte) *End {
	ed := ev.Digest()
	sd := sha256.Sum256(sealed)
	return &End{
		Host: host, EvidenceDigest: ed[:], HPKEPublicKey: bytes.Clone(ev.HPKEPublicKey),
		Nonce: bytes.Clone(nonce), SealedDigest: sd[:],
	}
}

// Grant is the keybroker's signed statement of one release, adoption or reissue.
type Grant struct {
	// Kind is always the constant Kind; Verify refuses any other document.
	Kind string `json:"kind"`
	// Op is what the grant was issued for: a release, an adoption or a reissue.
	Op Op `json:"op"`
	// MigrationID is the migration (or the adoption's or reissue's operation id) the keys
	// were released for; the sealed blobs open only under it (seal.Info).
	MigrationID string `json:"migrationId"`
	// Tenant and VM name the guest whose keys these are.
	Tenant string `json:"tenant"`
	VM     string `json:"vm"`
	// FromEpoch is the guest's epoch at the source (release), 0 for an adoption, the current
	// epoch for a reissue; ToEpoch is the epoch of the MDK sealed (release: FromEpoch+1,
	// adoption: 1, reissue: the current epoch).
	FromEpoch uint64 `json:"fromEpoch"`
	ToEpoch   uint64 `json:"toEpoch"`
	// Source is the source agent (release only).
	Source *End `json:"source,omitempty"`
	// Destination is the agent that receives the MDK: the destination of a release, the
	// agent of an adoption or reissue.
	Destination *End `json:"destination"`
	// DataEndpoint is the destination's data-plane endpoint (host:port) as its attested
	// clean-memory statement states it (release only): the only address the source sends to.
	DataEndpoint string `json:"dataEndpoint,omitempty"`
	// ZeroPageElision says the tenant's policy lets the source skip zero pages (release).
	ZeroPageElision bool `json:"zeroPageElision,omitempty"`
	// MaxDowntime is the tenant's downtime limit (spec.transport.maxDowntime; release), zero
	// for none: the source holds a transfer to it whatever limit the broker asks for.
	MaxDowntime time.Duration `json:"maxDowntime,omitempty"`
	// PostCopy says the tenant's policy lets a libvirt migration switch to post-copy
	// (spec.transport.allowPostCopy; release).
	PostCopy bool `json:"postCopy,omitempty"`
	// PolicyDigest and PolicySVN name the tenant's signed policy that allowed the grant.
	PolicyDigest attest.HexBytes `json:"policyDigest"`
	PolicySVN    uint64          `json:"policySvn"`
	// IssuedAt is when the keybroker signed.
	IssuedAt time.Time `json:"issuedAt"`
}

// Sign returns g in an envelope signed by sign, which signs the PAE bytes it is given with
// the Ed25519 key pub (Vault Transit in the keybroker, ed25519.Sign in tests).
func Sign(g *Grant, pub ed25519.PublicKey, sign func(msg []byte) ([]byte, error)) ([]byte, error) {
	if g.Kind != Kind || g.MigrationID == "" || g.Destination == nil {
		return nil, errors.New("signing grant: incomplete grant")
	}
	payload, err := json.Marshal(g)
	if err != nil {
		return nil, fmt.Errorf("signing grant: %w", err)
	}
	env, err := dsse.Sign(PayloadType, payload, pub, sign)
	if err != nil {
		return nil, fmt.Errorf("signing grant: %w", err)
	}
	return json.Marshal(env)
}

// Verify checks that envelope is a grant signed by pub and returns it, proving nothing
// else: Check is what an agent calls. Errors wrap ErrRefused; a signature that does not
// verify with pub also wraps dsse.ErrSignature, an envelope that is not a grant's (another
// payload type) or not well-formed dsse.ErrMalformed.
func Verify(envelope []byte, pub ed25519.PublicKey) (*Grant, error) {
	env, err := dsse.Parse(envelope, MaxEnvelopeSize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	}
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("%w: payload type %q, not a grant's (%q): %w", ErrRefused, env.PayloadType, PayloadType, dsse.ErrMalformed)
	}
	payload, err := env.Verify(PayloadType, pub)
	switch {
	case errors.Is(err, dsse.ErrSignature):
		return nil, fmt.Errorf("%w: not signed by the pinned keybroker key: %w", ErrRefused, err)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	var g Grant
	if err := dec.Decode(&g); err != nil {
		return nil, fmt.Errorf("%w: decoding grant: %w", ErrRefused, err)
	}
	if g.Kind != Kind {
		return nil, fmt.Errorf("%w: kind %q, want %q", ErrRefused, g.Kind, Kind)
	}
	if g.Destination == nil {
		return nil, fmt.Errorf("%w: the grant names no destination", ErrRefused)
	}
	return &g, nil
}

// Parse decodes a grant without checking its signature, for a party that only reads what it
// names (the broker picks which HPKE key an end's erasure evidence binds); Check is what an
// agent calls. Errors wrap ErrRefused.
func Parse(envelope []byte) (*Grant, error) {
	env, err := dsse.Parse(envelope, MaxEnvelopeSize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	}
	if env.PayloadType != PayloadType {
		return nil, fmt.Errorf("%w: payload type %q is not a grant's", ErrRefused, env.PayloadType)
	}
	var g Grant
	if err := json.Unmarshal(env.Payload, &g); err != nil {
		return nil, fmt.Errorf("%w: decoding grant: %w", ErrRefused, err)
	}
	return &g, nil
}

// Expectation is what an agent knows for itself and requires a grant to match.
type Expectation struct {
	// Op is the operation the agent is taking keys for.
	Op Op
	// MigrationID is the migration (or adoption or reissue) id the agent attested under.
	MigrationID string
	// Role is the agent's role: source or destination for a release, adopt otherwise.
	Role attest.Role
	// Tenant and VM name the guest the agent holds or is to receive.
	Tenant, VM string
	// Host is the agent's own host.
	Host string
	// HPKEPublicKey is the public half of the agent's key for this migration.
	HPKEPublicKey []byte
	// Nonce is the nonce the agent bound its evidence to.
	Nonce []byte
	// Sealed is the sealed key blob delivered with the grant.
	Sealed []byte
	// Epoch, if not zero, is the epoch the agent knows: a source's guest epoch (the grant's
	// FromEpoch).
	Epoch uint64
}

// Check verifies envelope's signature with the pinned keybroker key pub and checks that the
// grant authorizes exactly what want describes: the operation, migration, guest, the agent's
// own end (host, HPKE key, nonce, sealed blob) and, for a release, that both ends are named
// and the epochs follow. It returns the grant, or an error wrapping ErrRefused that names the
// first field that did not match.
func Check(envelope []byte, pub ed25519.PublicKey, want Expectation) (*Grant, error) {
	g, err := Verify(envelope, pub)
	if err != nil {
		return nil, err
	}
	refuse := func(format string, args ...any) (*Grant, error) {
		return nil, fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, args...))
	}
	switch {
	case g.Op != want.Op:
		return refuse("grant for %q, want %q", g.Op, want.Op)
	case g.MigrationID != want.MigrationID:
		return refuse("grant names migration %q, want %q", g.MigrationID, want.MigrationID)
	case g.Tenant != want.Tenant || g.VM != want.VM:
		return refuse("grant names guest %s/%s, want %s/%s", g.Tenant, g.VM, want.Tenant, want.VM)
	}
	var own *End
	switch want.Role {
	case attest.RoleSource:
		own = g.Source
	case attest.RoleDestination, attest.RoleAdopt:
		own = g.Destination
	default:
		return refuse("role %q receives no keys", want.Role)
	}
	// A release has a source and a destination; an adoption or reissue has one agent.
	var takesPart bool
	switch want.Op {
	case OpRelease:
		takesPart = want.Role == attest.RoleSource || want.Role == attest.RoleDestination
	case OpAdopt, OpReissue:
		takesPart = want.Role == attest.RoleAdopt
	}
	if !takesPart {
		return refuse("role %q does not take part in a %s", want.Role, want.Op)
	}
	if own == nil {
		return refuse("grant names no %s", want.Role)
	}
	sealed := sha256.Sum256(want.Sealed)
	switch {
	case own.Host != want.Host:
		return refuse("grant is for host %q, this is %q", own.Host, want.Host)
	case !bytes.Equal(own.HPKEPublicKey, want.HPKEPublicKey):
		return refuse("grant names another HPKE key for the %s", want.Role)
	case subtle.ConstantTimeCompare(own.Nonce, want.Nonce) != 1:
		return refuse("grant names another nonce for the %s than the one it attested with", want.Role)
	case !bytes.Equal(own.SealedDigest, sealed[:]):
		return refuse("the sealed keys are not the ones the grant names")
	}
	switch g.Op {
	case OpRelease:
		switch {
		case g.Source == nil:
			return refuse("release grant names no source")
		case g.ToEpoch != g.FromEpoch+1 || g.FromEpoch == 0:
			return refuse("release grant for epochs %d→%d", g.FromEpoch, g.ToEpoch)
		case g.DataEndpoint == "":
			return refuse("release grant names no data endpoint")
		case bytes.Equal(g.Source.HPKEPublicKey, g.Destination.HPKEPublicKey):
			return refuse("release grant names one HPKE key for both ends")
		}
		if want.Role == attest.RoleSource && want.Epoch != 0 && want.Epoch != g.FromEpoch {
			return refuse("grant moves the guest from epoch %d, it is in epoch %d here", g.FromEpoch, want.Epoch)
		}
	case OpAdopt:
		if g.FromEpoch != 0 || g.ToEpoch != 1 {
			return refuse("adoption grant for epochs %d→%d", g.FromEpoch, g.ToEpoch)
		}
	case OpReissue:
		if g.ToEpoch == 0 || g.FromEpoch != g.ToEpoch {
			return refuse("reissue grant for epochs %d→%d", g.FromEpoch, g.ToEpoch)
		}
	default:
		return refuse("unknown operation %q", g.Op)
	}
	return g, nil
}

// commitInfo labels the commit acknowledgement's MAC key.
const commitInfo = "lethe/v1/commit"

// MaxCommitAck bounds an encoded commit acknowledgement.
const MaxCommitAck = 4096

// ErrCommitAck is returned (wrapped) by CommitAck.Verify and ParseCommitAck for an
// acknowledgement that is malformed, for another migration, or whose MAC does not verify.
var ErrCommitAck = errors.New("invalid commit acknowledgement")

// CommitAck is the destination's commit acknowledgement: proof, checkable by anyone who
// holds TK, that the destination received the whole transfer whose transcript it names.
type CommitAck struct {
	// MigrationID is the migration committed.
	MigrationID string `json:"migrationId"`
	// Transcript is SHA-256("lethe/v1/commit" ‖ handshake transcript hash ‖ the transcript
	// hash of every stream's FIN, in stream order).
	Transcript []byte `json:"transcript"`
	// MAC is HMAC-SHA256(K, "destination" ‖ Transcript) with K = HKDF-SHA256(TK, salt =
	// migration id, info = "lethe/v1/commit").
	MAC []byte `json:"mac"`
}

// CommitMAC returns the MAC of a commit acknowledgement of transcript under tk.
func CommitMAC(tk []byte, migrationID string, transcript []byte) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, tk, []byte(migrationID), commitInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving the commit key: %w", err)
	}
	defer clear(k)
	m := hmac.New(sha256.New, k)
	m.Write([]byte("destination"))
	m.Write(transcript)
	return m.Sum(nil), nil
}

// Verify checks that c acknowledges migrationID and that its MAC verifies under tk. It returns
// an error wrapping ErrCommitAck when it does not.
func (c *CommitAck) Verify(tk []byte, migrationID string) error {
	if c.MigrationID != migrationID {
		return fmt.Errorf("%w: it acknowledges migration %q, not %q", ErrCommitAck, c.MigrationID, migrationID)
	}
	if len(c.Transcript) != sha256.Size {
		return fmt.Errorf("%w: transcript of %d bytes", ErrCommitAck, len(c.Transcript))
	}
	want, err := CommitMAC(tk, migrationID, c.Transcript)
	if err != nil {
		return err
	}
	if !hmac.Equal(c.MAC, want) {
		return fmt.Errorf("%w: the MAC does not verify under the migration's transfer key", ErrCommitAck)
	}
	return nil
}

// ParseCommitAck decodes an encoded commit acknowledgement (JSON). It proves nothing; Verify
// does. Errors wrap ErrCommitAck.
func ParseCommitAck(b []byte) (*CommitAck, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: none", ErrCommitAck)
	}
	if len(b) > MaxCommitAck {
		return nil, fmt.Errorf("%w: %d bytes exceeds %d", ErrCommitAck, len(b), MaxCommitAck)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c CommitAck
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCommitAck, err)
	}
	return &c, nil
}
