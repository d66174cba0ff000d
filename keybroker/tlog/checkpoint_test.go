package tlog

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/mod/sumdb/note"
)

const testOrigin = "lethe.example/residency"

func testKey(seed byte) ed25519.PrivateKey {
	return ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize))
}

// signWith returns the sign function Sign wants for an Ed25519 key held in memory.
func signWith(k ed25519.PrivateKey) func([]byte) ([]byte, error) {
	return func(msg []byte) ([]byte, error) { return ed25519.Sign(k, msg), nil }
}

func testCheckpoint(t *testing.T, size uint64) Checkpoint {
	t.Helper()
	_, tree := testLeaves(int(size))
	root, err := tree.Root(size)
	if err != nil {
		t.Fatal(err)
	}
	return Checkpoint{Origin: testOrigin, Size: size, Root: root}
}

func signCheckpoint(t testing.TB, c Checkpoint, k ed25519.PrivateKey) []byte {
	t.Helper()
	b, err := Sign(c, k.Public().(ed25519.PublicKey), signWith(k))
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	return b
}

func logVerifier(t testing.TB, origin string, k ed25519.PrivateKey) note.Verifier {
	t.Helper()
	v, err := LogVerifier(origin, k.Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatalf("LogVerifier: %v", err)
	}
	return v
}

var pinnedTime = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func testWitness(t *testing.T, name string, seed byte) (*WitnessSigner, *WitnessVerifier) {
	t.Helper()
	s, err := NewWitnessSigner(name, testKey(seed), func() time.Time { return pinnedTime })
	if err != nil {
		t.Fatalf("NewWitnessSigner: %v", err)
	}
	v, err := ParseWitnessKey(s.VerifierKey())
	if err != nil {
		t.Fatalf("ParseWitnessKey(%q): %v", s.VerifierKey(), err)
	}
	return s, v
}

func cosign(t *testing.T, c Checkpoint, w note.Signer) []byte {
	t.Helper()
	b, err := note.Sign(&note.Note{Text: c.Text()}, w)
	if err != nil {
		t.Fatalf("cosigning: %v", err)
	}
	return b
}

// The signed note's bytes, written out from the C2SP signed-note and tlog-checkpoint texts.
func TestSignWritesTheSpecifiedNote(t *testing.T) {
	k := testKey(1)
	c := testCheckpoint(t, 7)
	pub := k.Public().(ed25519.PublicKey)
	text := testOrigin + "\n7\n" + base64.StdEncoding.EncodeToString(c.Root) + "\n"
	if c.Text() != text {
		t.Fatalf("Text() = %q, want %q", c.Text(), text)
	}
	h := sha256.Sum256(append(append([]byte(testOrigin+"\n"), 0x01), pub...))
	sig := append(h[:4:4], ed25519.Sign(k, []byte(text))...)
	want := text + "\n— " + testOrigin + " " + base64.StdEncoding.EncodeToString(sig) + "\n"
	if got := signCheckpoint(t, c, k); string(got) != want {
		t.Errorf("Sign:\n%s\nwant:\n%s", got, want)
	}

	w, _ := testWitness(t, "witness.example", 2)
	wpub := testKey(2).Public().(ed25519.PublicKey)
	wh := sha256.Sum256(append(append([]byte("witness.example\n"), 0x04), wpub...))
	msg := "cosignature/v1\ntime " + "1772366400" + "\n" + text
	cosig := append(append(wh[:4:4], binary.BigEndian.AppendUint64(nil, uint64(pinnedTime.Unix()))...), ed25519.Sign(testKey(2), []byte(msg))...)
	wantCosigned := text + "\n— witness.example " + base64.StdEncoding.EncodeToString(cosig) + "\n"
	if got := cosign(t, c, w); string(got) != wantCosigned {
		t.Errorf("cosignature:\n%s\nwant:\n%s", got, wantCosigned)
	}
	if wantKey := "witness.example+" + hexUint32(binary.BigEndian.Uint32(wh[:4])) + "+" + base64.StdEncoding.EncodeToString(append([]byte{0x04}, wpub...)); w.VerifierKey() != wantKey {
		t.Errorf("VerifierKey() = %q, want %q", w.VerifierKey(), wantKey)
	}
}

func hexUint32(v uint32) string {
	const digits = "0123456789abcdef"
	var b [8]byte
	for i := 7; i >= 0; i-- {
		b[i] = digits[v&0xf]
		v >>= 4
	}
	return string(b[:])
}

func TestOpen(t *testing.T) {
	k := testKey(1)
	c := testCheckpoint(t, 12)
	signed := signCheckpoint(t, c, k)
	lv := logVerifier(t, testOrigin, k)

	got, err := Open(signed, lv, nil, 0)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if diff := cmp.Diff(&Signed{Checkpoint: c, Note: signed}, got); diff != "" {
		t.Errorf("Open (-want +got):\n%s", diff)
	}

	other := signCheckpoint(t, Checkpoint{Origin: "other.example/log", Size: c.Size, Root: c.Root}, k)
	altered := func(from, to string) []byte {
		b := bytes.Replace(signed, []byte(from), []byte(to), 1)
		if bytes.Equal(b, signed) {
			t.Fatalf("%q not in the note", from)
		}
		return b
	}
	otherRoot := testCheckpoint(t, 13).Root
	bad := map[string]struct {
		signed []byte
		key    note.Verifier
	}{
		"another key":       {signed, logVerifier(t, testOrigin, testKey(9))},
		"size altered":      {altered("\n12\n", "\n13\n"), lv},
		"root altered":      {altered(base64.StdEncoding.EncodeToString(c.Root), base64.StdEncoding.EncodeToString(otherRoot)), lv},
		"another origin":    {other, lv},
		"origin unlike key": {signedByNameOf(t, testOrigin, k, Checkpoint{Origin: "other.example/log", Size: 12, Root: c.Root}), lv},
	}
	for name, tc := range bad {
		t.Run(name, func(t *testing.T) {
			if _, err := Open(tc.signed, tc.key, nil, 0); !errors.Is(err, ErrBadSignature) {
				t.Errorf("Open: %v, want ErrBadSignature", err)
			}
		})
	}

	for name, b := range map[string][]byte{
		"no signatures":     []byte(c.Text() + "\n"),
		"not a note":        []byte("hello"),
		"control character": altered(testOrigin, testOrigin+"\x01"),
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := Open(b, lv, nil, 0); err == nil {
				t.Error("Open: no error")
			}
		})
	}
}

// nameSigner signs a note under a chosen name with a log key.
type nameSigner struct {
	name string
	k    ed25519.PrivateKey
}

func (s nameSigner) Name() string { return s.name }
func (s nameSigner) KeyHash() uint32 {
	return keyHash(s.name, algEd25519, s.k.Public().(ed25519.PublicKey))
}
func (s nameSigner) Sign(msg []byte) ([]byte, error) { return ed25519.Sign(s.k, msg), nil }

// signedByNameOf signs c's text with the log key named name, whatever c's origin.
func signedByNameOf(t *testing.T, name string, k ed25519.PrivateKey, c Checkpoint) []byte {
	t.Helper()
	b, err := note.Sign(&note.Note{Text: c.Text()}, nameSigner{name, k})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestWitnessCosignatures(t *testing.T) {
	k := testKey(1)
	c := testCheckpoint(t, 20)
	signed := signCheckpoint(t, c, k)
	lv := logVerifier(t, testOrigin, k)
	w1, v1 := testWitness(t, "w1.example", 2)
	w2, v2 := testWitness(t, "w2.example", 3)
	w3, _ := testWitness(t, "w3.example", 4) // a witness the tenant does not know
	known := []*WitnessVerifier{v1, v2}

	add := func(signed, cosigned []byte) []byte {
		t.Helper()
		b, err := AddCosignatures(signed, cosigned, known)
		if err != nil {
			t.Fatalf("AddCosignatures: %v", err)
		}
		return b
	}
	witnesses := func(signed []byte, min int) ([]string, error) {
		s, err := Open(signed, lv, known, min)
		if err != nil {
			return nil, err
		}
		return s.Witnesses, nil
	}

	one := add(signed, cosign(t, c, w1))
	if got, err := witnesses(one, 1); err != nil || !cmp.Equal(got, []string{"w1.example"}) {
		t.Errorf("one cosignature, 1 required: %v, %v", got, err)
	}
	if _, err := witnesses(one, 2); !errors.Is(err, ErrTooFewWitnesses) {
		t.Errorf("one cosignature, 2 required: %v, want ErrTooFewWitnesses", err)
	}
	if _, err := witnesses(signed, 1); !errors.Is(err, ErrTooFewWitnesses) {
		t.Errorf("no cosignature, 1 required: %v, want ErrTooFewWitnesses", err)
	}

	two := add(one, cosign(t, c, w2))
	if got, err := witnesses(two, 2); err != nil || !cmp.Equal(got, []string{"w1.example", "w2.example"}) {
		t.Errorf("two cosignatures, 2 required: %v, %v", got, err)
	}
	if again := add(two, cosign(t, c, w2)); !bytes.Equal(again, two) {
		t.Errorf("the same cosignature added twice:\n%s", again)
	}

	// w1 cosigns again at another time: a second line, the same witness.
	w1later, err := NewWitnessSigner("w1.example", testKey(2), func() time.Time { return pinnedTime.Add(time.Hour) })
	if err != nil {
		t.Fatal(err)
	}
	twice := add(two, cosign(t, c, w1later))
	if bytes.Equal(twice, two) {
		t.Fatal("a later cosignature by w1 was not added")
	}
	if _, err := witnesses(twice, 3); !errors.Is(err, ErrTooFewWitnesses) {
		t.Errorf("w1 twice and w2, 3 required: %v, want ErrTooFewWitnesses", err)
	}

	// An unknown witness's cosignature is not merged, and not counted when present.
	if got := add(one, cosign(t, c, w3)); !bytes.Equal(got, one) {
		t.Errorf("AddCosignatures took an unknown witness's cosignature:\n%s", got)
	}
	withUnknown := append(bytes.Clone(one), sigLines(t, cosign(t, c, w3))...)
	if got, err := witnesses(withUnknown, 1); err != nil || !cmp.Equal(got, []string{"w1.example"}) {
		t.Errorf("w1 and unknown w3: %v, %v", got, err)
	}
	if _, err := witnesses(withUnknown, 2); !errors.Is(err, ErrTooFewWitnesses) {
		t.Errorf("w1 and unknown w3, 2 required: %v, want ErrTooFewWitnesses", err)
	}

	// The log's own signature is not a witness's.
	if got := add(signed, signed); !bytes.Equal(got, signed) {
		t.Errorf("AddCosignatures of the log's signature:\n%s", got)
	}

	// A forged cosignature by a known witness: not merged, and the checkpoint carrying it
	// does not open.
	forged := forge(t, cosign(t, c, w2))
	if got := add(one, forged); !bytes.Equal(got, one) {
		t.Errorf("AddCosignatures took a forged cosignature:\n%s", got)
	}
	if _, err := Open(append(bytes.Clone(one), sigLines(t, forged)...), lv, known, 1); !errors.Is(err, ErrBadSignature) {
		t.Errorf("Open with a forged cosignature: %v, want ErrBadSignature", err)
	}
	// A cosignature whose timestamp was changed is a forgery too.
	retimed := cosign(t, c, w2)
	line := sigLines(t, retimed)
	raw := decodeSigLine(t, line)
	raw[4+7]++
	if got := add(one, []byte(c.Text()+"\n— w2.example "+base64.StdEncoding.EncodeToString(raw)+"\n")); !bytes.Equal(got, one) {
		t.Errorf("AddCosignatures took a cosignature with another timestamp:\n%s", got)
	}

	// A cosignature of another checkpoint.
	if _, err := AddCosignatures(signed, cosign(t, testCheckpoint(t, 21), w1), known); !errors.Is(err, ErrMalformed) {
		t.Errorf("AddCosignatures of another checkpoint: %v, want ErrMalformed", err)
	}
	if _, err := AddCosignatures([]byte("no note"), one, known); !errors.Is(err, ErrMalformed) {
		t.Errorf("AddCosignatures to a non-note: %v, want ErrMalformed", err)
	}
}

// sigLines returns the signature lines of a signed note.
func sigLines(t *testing.T, signed []byte) []byte {
	t.Helper()
	i := bytes.LastIndex(signed, []byte("\n\n"))
	if i < 0 {
		t.Fatalf("not a signed note: %q", signed)
	}
	return signed[i+2:]
}

func decodeSigLine(t *testing.T, line []byte) []byte {
	t.Helper()
	f := strings.Fields(string(line))
	if len(f) != 3 {
		t.Fatalf("signature line %q", line)
	}
	raw, err := base64.StdEncoding.DecodeString(f[2])
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// forge flips a bit of the Ed25519 signature in a note's one signature line.
func forge(t *testing.T, signed []byte) []byte {
	t.Helper()
	i := bytes.LastIndex(signed, []byte("\n\n"))
	line := sigLines(t, signed)
	raw := decodeSigLine(t, line)
	raw[len(raw)-1] ^= 0x01
	name := strings.Fields(string(line))[1]
	return append(bytes.Clone(signed[:i+2]), []byte("— "+name+" "+base64.StdEncoding.EncodeToString(raw)+"\n")...)
}

func TestParseWitnessKey(t *testing.T) {
	w, v := testWitness(t, "witness.example", 2)
	if v.Name() != w.Name() || v.KeyHash() != w.KeyHash() {
		t.Errorf("ParseWitnessKey(VerifierKey()) = %s %08x, want %s %08x", v.Name(), v.KeyHash(), w.Name(), w.KeyHash())
	}
	msg := []byte("text\n")
	sig, err := w.Sign(msg)
	if err != nil {
		t.Fatal(err)
	}
	if !v.Verify(msg, sig) {
		t.Error("the parsed key does not verify the witness's cosignature")
	}
	if v.Verify([]byte("other\n"), sig) || v.Verify(msg, sig[:len(sig)-1]) {
		t.Error("the parsed key verifies a cosignature of another text, or a truncated one")
	}

	good := w.VerifierKey()
	name, rest, _ := strings.Cut(good, "+")
	hash, key, _ := strings.Cut(rest, "+")
	raw, _ := base64.StdEncoding.DecodeString(key)
	ed25519Key, err := note.NewEd25519VerifierKey(name, raw[1:])
	if err != nil {
		t.Fatal(err)
	}
	withAlg := func(alg byte) string {
		return name + "+" + hash + "+" + base64.StdEncoding.EncodeToString(append([]byte{alg}, raw[1:]...))
	}
	for bad, vkey := range map[string]string{
		"empty":            "",
		"no hash":          name + "+" + key,
		"short hash":       name + "+" + hash[1:] + "+" + key,
		"hash not hex":     name + "+zzzzzzzz+" + key,
		"wrong hash":       name + "+00000000+" + key,
		"another name":     "other.example+" + hash + "+" + key,
		"name with space":  "wit ness+" + hash + "+" + key,
		"empty name":       "+" + hash + "+" + key,
		"key not base64":   name + "+" + hash + "+!!!!",
		"short key":        name + "+" + hash + "+" + base64.StdEncoding.EncodeToString(raw[:20]),
		"Ed25519 note key": ed25519Key,
		"algorithm 0x01":   withAlg(0x01),
		"extra field":      good + "+AAAA",
		"trailing garbage": good + "x",
	} {
		t.Run(bad, func(t *testing.T) {
			if _, err := ParseWitnessKey(vkey); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseWitnessKey(%q): %v, want ErrMalformed", vkey, err)
			}
		})
	}
	if _, err := NewWitnessSigner("bad name", testKey(2), nil); err == nil {
		t.Error("NewWitnessSigner with a space in the name: no error")
	}
}

func TestParseCheckpoint(t *testing.T) {
	c := testCheckpoint(t, 5)
	got, err := ParseCheckpoint(c.Text())
	if err != nil {
		t.Fatalf("ParseCheckpoint(Text()): %v", err)
	}
	if diff := cmp.Diff(c, got); diff != "" {
		t.Errorf("ParseCheckpoint(Text()) (-want +got):\n%s", diff)
	}
	root := base64.StdEncoding.EncodeToString(c.Root)
	for bad, text := range map[string]string{
		"empty":                   "",
		"extension line":          testOrigin + "\n5\n" + root + "\nextension\n",
		"no final newline":        testOrigin + "\n5\n" + root,
		"two lines":               testOrigin + "\n5\n",
		"leading zero":            testOrigin + "\n05\n" + root + "\n",
		"plus sign":               testOrigin + "\n+5\n" + root + "\n",
		"negative":                testOrigin + "\n-5\n" + root + "\n",
		"space in size":           testOrigin + "\n 5\n" + root + "\n",
		"empty size":              testOrigin + "\n\n" + root + "\n",
		"size overflows":          testOrigin + "\n18446744073709551616\n" + root + "\n",
		"hex size":                testOrigin + "\n0x5\n" + root + "\n",
		"root not base64":         testOrigin + "\n5\n" + "!" + root[1:] + "\n",
		"root of 31 bytes":        testOrigin + "\n5\n" + base64.StdEncoding.EncodeToString(c.Root[:31]) + "\n",
		"root of 33 bytes":        testOrigin + "\n5\n" + base64.StdEncoding.EncodeToString(append(c.Root, 0)) + "\n",
		"empty root":              testOrigin + "\n5\n\n",
		"root unpadded":           testOrigin + "\n5\n" + strings.TrimRight(root, "=") + "\n",
		"root in URL base64":      testOrigin + "\n5\n" + base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0xff}, 32)) + "\n",
		"empty origin":            "\n5\n" + root + "\n",
		"origin with space":       "lethe example\n5\n" + root + "\n",
		"origin with plus":        "lethe+example\n5\n" + root + "\n",
		"carriage return endings": testOrigin + "\r\n5\r\n" + root + "\r\n",
	} {
		t.Run(bad, func(t *testing.T) {
			if _, err := ParseCheckpoint(text); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseCheckpoint(%q): %v, want ErrMalformed", text, err)
			}
		})
	}
	if _, err := Sign(Checkpoint{Origin: "bad origin", Size: 1, Root: c.Root}, testKey(1).Public().(ed25519.PublicKey), signWith(testKey(1))); err == nil {
		t.Error("Sign with a space in the origin: no error")
	}
}

func TestCheckExtends(t *testing.T) {
	leaves, tree := testLeaves(40)
	cp := func(tr *Tree, size uint64) Checkpoint {
		root, err := tr.Root(size)
		if err != nil {
			t.Fatal(err)
		}
		return Checkpoint{Origin: testOrigin, Size: size, Root: root}
	}
	proof := func(tr *Tree, size1, size2 uint64) [][]byte {
		p, err := tr.ConsistencyProof(size1, size2)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// fork shares the first 20 leaves of tree, then its own.
	fork := &Tree{}
	for i, l := range leaves {
		if i >= 20 {
			l = append([]byte("fork "), l...)
		}
		fork.Append(LeafHash(l))
	}

	for name, tc := range map[string]struct {
		prev, next Checkpoint
		proof      [][]byte
		ok         bool
	}{
		"equal":                         {cp(tree, 30), cp(tree, 30), nil, true},
		"grown":                         {cp(tree, 10), cp(tree, 30), proof(tree, 10, 30), true},
		"grown from empty":              {cp(tree, 0), cp(tree, 30), nil, true},
		"grown by one":                  {cp(tree, 39), cp(tree, 40), proof(tree, 39, 40), true},
		"fork grown from shared prefix": {cp(tree, 20), cp(fork, 30), proof(fork, 20, 30), true},
		"grown without proof":           {cp(tree, 10), cp(tree, 30), nil, false},
		"grown with another's proof":    {cp(tree, 10), cp(tree, 30), proof(tree, 11, 30), false},
		"shrunk":                        {cp(tree, 30), cp(tree, 10), proof(tree, 10, 30), false},
		"same size, other root":         {cp(tree, 30), cp(fork, 30), nil, false},
		"forked, fork's proof":          {cp(tree, 25), cp(fork, 30), proof(fork, 25, 30), false},
		"forked, honest proof":          {cp(tree, 25), cp(fork, 30), proof(tree, 25, 30), false},
		"another log": {cp(tree, 10), Checkpoint{Origin: "other.example/log", Size: 30, Root: cp(tree, 30).Root},
			proof(tree, 10, 30), false},
	} {
		t.Run(name, func(t *testing.T) {
			err := CheckExtends(tc.prev, tc.next, tc.proof)
			if tc.ok && err != nil {
				t.Errorf("CheckExtends: %v", err)
			}
			if !tc.ok && !errors.Is(err, ErrInconsistent) {
				t.Errorf("CheckExtends: %v, want ErrInconsistent", err)
			}
		})
	}
}

func FuzzParseCheckpoint(f *testing.F) {
	root := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
	f.Add(testOrigin + "\n5\n" + root + "\n")
	f.Add(testOrigin + "\n0\n" + root + "\n")
	f.Add(testOrigin + "\n18446744073709551615\n" + root + "\n")
	f.Add(testOrigin + "\n5\n" + root + "\next\n")
	f.Add(testOrigin + "\n05\n" + root + "\n")
	f.Add("\n\n\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, text string) {
		c, err := ParseCheckpoint(text)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseCheckpoint: %v, not ErrMalformed", err)
			}
			return
		}
		again, err := ParseCheckpoint(c.Text())
		if err != nil {
			t.Fatalf("ParseCheckpoint(%q) = %+v, whose Text does not parse: %v", text, c, err)
		}
		if diff := cmp.Diff(c, again); diff != "" {
			t.Fatalf("ParseCheckpoint(Text()) changed the checkpoint (-first +again):\n%s", diff)
		}
	})
}

// TestParseUnverified reads which checkpoint a signed note is, cosigned or not, and refuses
// what is not a signed note.
func TestParseUnverified(t *testing.T) {
	c := testCheckpoint(t, 7)
	signed := signCheckpoint(t, c, testKey(1))
	got, err := ParseUnverified(signed)
	if err != nil || got.Text() != c.Text() {
		t.Fatalf("ParseUnverified = %q, %v; want %q", got.Text(), err, c.Text())
	}
	if _, err := ParseUnverified([]byte(c.Text())); !errors.Is(err, ErrMalformed) {
		t.Errorf("an unsigned text: %v, want ErrMalformed", err)
	}
}
