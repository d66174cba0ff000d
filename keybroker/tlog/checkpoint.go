package tlog

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"

	"golang.org/x/mod/sumdb/note"
)

// Checkpoint is a signed statement of the log's size and root hash (C2SP tlog-checkpoint):
// the note text "<origin>\n<size>\n<base64 root>\n", signed by the keybroker's Ed25519 key
// under the name Origin, and cosigned by witnesses.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   []byte
}

// Text returns the checkpoint's note text (the signed body).
func (c Checkpoint) Text() string {
	return c.Origin + "\n" + strconv.FormatUint(c.Size, 10) + "\n" + base64.StdEncoding.EncodeToString(c.Root) + "\n"
}

// ParseCheckpoint decodes a checkpoint's note text. Lines after the root (extension lines) are
// refused: Lethe writes none.
func ParseCheckpoint(text string) (Checkpoint, error) {
	lines := strings.SplitAfter(text, "\n")
	if len(lines) != 4 || lines[3] != "" {
		return Checkpoint{}, fmt.Errorf("decoding checkpoint: %w: want 3 lines", ErrMalformed)
	}
	origin := strings.TrimSuffix(lines[0], "\n")
	size, err := strconv.ParseUint(strings.TrimSuffix(lines[1], "\n"), 10, 64)
	if err != nil || strconv.FormatUint(size, 10)+"\n" != lines[1] {
		return Checkpoint{}, fmt.Errorf("decoding checkpoint: %w: size %q", ErrMalformed, strings.TrimSpace(lines[1]))
	}
	root, err := base64.StdEncoding.DecodeString(strings.TrimSuffix(lines[2], "\n"))
	if err != nil || len(root) != sha256.Size {
		return Checkpoint{}, fmt.Errorf("decoding checkpoint: %w: root hash", ErrMalformed)
	}
	if !validName(origin) {
		return Checkpoint{}, fmt.Errorf("decoding checkpoint: %w: origin %q", ErrMalformed, origin)
	}
	c := Checkpoint{Origin: origin, Size: size, Root: root}
	if c.Text() != text {
		return Checkpoint{}, fmt.Errorf("decoding checkpoint: %w: root hash not in canonical base64", ErrMalformed)
	}
	return c, nil
}

// ParseUnverified decodes the checkpoint of a signed note without checking any signature: to
// tell which checkpoint a note is (its size, say), never to trust it (Open does that). It
// returns ErrMalformed, wrapped.
func ParseUnverified(signed []byte) (Checkpoint, error) {
	text, _, err := splitNote(signed)
	if err != nil {
		return Checkpoint{}, err
	}
	return ParseCheckpoint(string(text))
}

// validName says whether s may name a key in a note: not empty, no spaces, no "+".
func validName(s string) bool {
	return s != "" && !strings.ContainsFunc(s, unicode.IsSpace) && !strings.Contains(s, "+")
}

// The signature algorithms of note keys (C2SP signed-note).
const (
	algEd25519     = 0x01
	algCosignature = 0x04
)

func keyHash(name string, alg byte, pub []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name + "\n"))
	h.Write([]byte{alg})
	h.Write(pub)
	return binary.BigEndian.Uint32(h.Sum(nil))
}

// Errors of opening checkpoints.
var (
	// ErrBadSignature: the checkpoint is not signed by the log's key.
	ErrBadSignature = errors.New("checkpoint not signed by the log's key")
	// ErrTooFewWitnesses: fewer witnesses than required cosigned the checkpoint.
	ErrTooFewWitnesses = errors.New("too few witness cosignatures")
)

// logSigner signs checkpoints with an Ed25519 key held elsewhere (Vault Transit).
type logSigner struct {
	name string
	hash uint32
	sign func([]byte) ([]byte, error)
}

func (s *logSigner) Name() string                    { return s.name }
func (s *logSigner) KeyHash() uint32                 { return s.hash }
func (s *logSigner) Sign(msg []byte) ([]byte, error) { return s.sign(msg) }

// Sign returns the checkpoint as a signed note, signed with the Ed25519 key whose public half
// is pub through sign (which must return a pure Ed25519 signature of its argument).
func Sign(c Checkpoint, pub ed25519.PublicKey, sign func([]byte) ([]byte, error)) ([]byte, error) {
	if !validName(c.Origin) {
		return nil, fmt.Errorf("signing checkpoint: origin %q is not a valid key name", c.Origin)
	}
	s := &logSigner{name: c.Origin, hash: keyHash(c.Origin, algEd25519, pub), sign: sign}
	b, err := note.Sign(&note.Note{Text: c.Text()}, s)
	if err != nil {
		return nil, fmt.Errorf("signing checkpoint: %w", err)
	}
	return b, nil
}

// LogVerifier returns the note verifier of a log's checkpoints: origin is the log's name, pub
// the keybroker's receipt-signing key.
func LogVerifier(origin string, pub ed25519.PublicKey) (note.Verifier, error) {
	vkey, err := note.NewEd25519VerifierKey(origin, pub)
	if err != nil {
		return nil, fmt.Errorf("making the log's verifier key: %w", err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		return nil, fmt.Errorf("making the log's verifier: %w", err)
	}
	return v, nil
}

// Signed is a checkpoint that verified: its fields, the signed note as given, and the names of
// the witnesses whose cosignatures verified.
type Signed struct {
	Checkpoint
	Note      []byte
	Witnesses []string
}

// Open verifies a signed checkpoint: the log's signature (logKey, from LogVerifier) and at
// least minWitnesses cosignatures by distinct witnesses among witnesses. Signatures by keys it
// does not know are ignored. It returns ErrMalformed, ErrBadSignature or ErrTooFewWitnesses,
// wrapped.
func Open(signed []byte, logKey note.Verifier, witnesses []*WitnessVerifier, minWitnesses int) (*Signed, error) {
	vs := []note.Verifier{logKey}
	for _, w := range witnesses {
		vs = append(vs, w)
	}
	n, err := note.Open(signed, note.VerifierList(vs...))
	if err != nil {
		if _, ok := errors.AsType[*note.UnverifiedNoteError](err); ok {
			return nil, fmt.Errorf("opening checkpoint: %w", ErrBadSignature)
		}
		if _, ok := errors.AsType[*note.InvalidSignatureError](err); ok {
			return nil, fmt.Errorf("opening checkpoint: %w: %w", ErrBadSignature, err)
		}
		return nil, fmt.Errorf("opening checkpoint: %w: %w", ErrMalformed, err)
	}
	out := &Signed{Note: signed}
	logSigned := false
	seen := map[string]bool{}
	for _, s := range n.Sigs {
		switch {
		case s.Name == logKey.Name() && s.Hash == logKey.KeyHash():
			logSigned = true
		case !seen[s.Name]:
			seen[s.Name] = true
			out.Witnesses = append(out.Witnesses, s.Name)
		}
	}
	if !logSigned {
		return nil, fmt.Errorf("opening checkpoint: %w", ErrBadSignature)
	}
	c, err := ParseCheckpoint(n.Text)
	if err != nil {
		return nil, err
	}
	if c.Origin != logKey.Name() {
		return nil, fmt.Errorf("opening checkpoint: %w: origin %q, want %q", ErrBadSignature, c.Origin, logKey.Name())
	}
	out.Checkpoint = c
	if len(out.Witnesses) < minWitnesses {
		return nil, fmt.Errorf("opening checkpoint of size %d: %w: %d of %d", c.Size, ErrTooFewWitnesses, len(out.Witnesses), minWitnesses)
	}
	return out, nil
}

// cosignedMessage is what a witness signs (C2SP tlog-cosignature v1).
func cosignedMessage(t uint64, text []byte) []byte {
	return append([]byte("cosignature/v1\ntime "+strconv.FormatUint(t, 10)+"\n"), text...)
}

// WitnessSigner cosigns checkpoints (C2SP tlog-cosignature v1: the signature is an 8-byte
// big-endian UNIX time and an Ed25519 signature of "cosignature/v1\ntime <t>\n" and the note
// text).
type WitnessSigner struct {
	name string
	key  ed25519.PrivateKey
	hash uint32
	now  func() time.Time
}

// NewWitnessSigner returns the signer of a witness named name. now nil: time.Now.
func NewWitnessSigner(name string, key ed25519.PrivateKey, now func() time.Time) (*WitnessSigner, error) {
	if !validName(name) {
		return nil, fmt.Errorf("witness name %q: no spaces or '+'", name)
	}
	if now == nil {
		now = time.Now
	}
	return &WitnessSigner{name: name, key: key, hash: keyHash(name, algCosignature, key.Public().(ed25519.PublicKey)), now: now}, nil
}

// Name returns the witness's name.
func (w *WitnessSigner) Name() string { return w.name }

// KeyHash returns the note key hash of the witness's key.
func (w *WitnessSigner) KeyHash() uint32 { return w.hash }

// Sign cosigns a note text.
func (w *WitnessSigner) Sign(msg []byte) ([]byte, error) {
	t := uint64(w.now().Unix())
	sig := binary.BigEndian.AppendUint64(nil, t)
	return append(sig, ed25519.Sign(w.key, cosignedMessage(t, msg))...), nil
}

// VerifierKey returns the witness's public verifier key: "<name>+<hash>+<base64(0x04 ‖ key)>".
func (w *WitnessSigner) VerifierKey() string {
	return verifierKey(w.name, algCosignature, w.key.Public().(ed25519.PublicKey))
}

func verifierKey(name string, alg byte, pub ed25519.PublicKey) string {
	return fmt.Sprintf("%s+%08x+%s", name, keyHash(name, alg, pub), base64.StdEncoding.EncodeToString(append([]byte{alg}, pub...)))
}

// WitnessVerifier checks a witness's cosignatures.
type WitnessVerifier struct {
	name string
	hash uint32
	pub  ed25519.PublicKey
}

// ParseWitnessKey decodes a witness's verifier key (WitnessSigner.VerifierKey).
func ParseWitnessKey(vkey string) (*WitnessVerifier, error) {
	name, rest, ok1 := strings.Cut(vkey, "+")
	hash16, key64, ok2 := strings.Cut(rest, "+")
	h, err1 := strconv.ParseUint(hash16, 16, 32)
	key, err2 := base64.StdEncoding.DecodeString(key64)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || len(hash16) != 8 || !validName(name) {
		return nil, fmt.Errorf("decoding witness key %q: %w", vkey, ErrMalformed)
	}
	if len(key) != 1+ed25519.PublicKeySize || key[0] != algCosignature {
		return nil, fmt.Errorf("decoding witness key %q: %w: not a cosignature/v1 Ed25519 key", vkey, ErrMalformed)
	}
	pub := ed25519.PublicKey(key[1:])
	if uint32(h) != keyHash(name, algCosignature, pub) {
		return nil, fmt.Errorf("decoding witness key %q: %w: key hash does not match", vkey, ErrMalformed)
	}
	return &WitnessVerifier{name: name, hash: uint32(h), pub: pub}, nil
}

// Name returns the witness's name.
func (v *WitnessVerifier) Name() string { return v.name }

// KeyHash returns the note key hash of the witness's key.
func (v *WitnessVerifier) KeyHash() uint32 { return v.hash }

// Verify checks a cosignature of a note text.
func (v *WitnessVerifier) Verify(msg, sig []byte) bool {
	if len(sig) != 8+ed25519.SignatureSize {
		return false
	}
	return ed25519.Verify(v.pub, cosignedMessage(binary.BigEndian.Uint64(sig), msg), sig[8:])
}

// AddCosignatures returns signed with the cosignature lines of cosigned added, where both are
// the same checkpoint (the same note text); only cosignatures that witnesses verify are taken,
// and none twice.
func AddCosignatures(signed, cosigned []byte, witnesses []*WitnessVerifier) ([]byte, error) {
	text, sigs, err := splitNote(signed)
	if err != nil {
		return nil, err
	}
	text2, sigs2, err := splitNote(cosigned)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(text, text2) {
		return nil, fmt.Errorf("adding cosignatures: %w: another checkpoint", ErrMalformed)
	}
	have := map[string]bool{}
	for _, s := range sigs {
		have[string(s)] = true
	}
	out := append(append([]byte(nil), text...), '\n')
	for _, s := range sigs {
		out = append(out, s...)
	}
	for _, s := range sigs2 {
		if have[string(s)] {
			continue
		}
		n, err := note.Open(append(append(append([]byte(nil), text...), '\n'), s...), note.VerifierList(asVerifiers(witnesses)...))
		if err != nil || len(n.Sigs) != 1 {
			continue
		}
		have[string(s)] = true
		out = append(out, s...)
	}
	return out, nil
}

func asVerifiers(ws []*WitnessVerifier) []note.Verifier {
	vs := make([]note.Verifier, len(ws))
	for i, w := range ws {
		vs[i] = w
	}
	return vs
}

// splitNote returns a signed note's text (with its final newline) and its signature lines
// (each with its newline).
func splitNote(signed []byte) ([]byte, [][]byte, error) {
	i := bytes.LastIndex(signed, []byte("\n\n"))
	if i < 0 || !bytes.HasSuffix(signed, []byte("\n")) {
		return nil, nil, fmt.Errorf("decoding signed note: %w", ErrMalformed)
	}
	text, rest := signed[:i+1], signed[i+2:]
	var sigs [][]byte
	for len(rest) > 0 {
		j := bytes.IndexByte(rest, '\n')
		if !bytes.HasPrefix(rest, []byte("— ")) {
			return nil, nil, fmt.Errorf("decoding signed note: %w: signature line", ErrMalformed)
		}
		sigs = append(sigs, rest[:j+1])
		rest = rest[j+1:]
	}
	return text, sigs, nil
}
