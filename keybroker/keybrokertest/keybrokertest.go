// Package keybrokertest holds fixtures the keybroker's tests share (package keybroker and its
// NATS edge, natsapi): emulated SEV-SNP platforms and a verifier that trusts them, the
// statements agents make, and the destination's commit acknowledgement. Emulated
// platforms prove nothing; the package is for tests only and must never be linked into a
// binary.
package keybrokertest

import (
	"crypto/sha256"
	"encoding/json"
	"sync"
	"testing"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
	"github.com/lethe-cc/lethe/keybroker/grant"
)

// platforms are made once per test binary: emulated platforms generate RSA roots.
var platforms = sync.OnceValues(func() (map[string]emulate.Platform, error) {
	out := map[string]emulate.Platform{}
	for name, tcb := range map[string]*attest.SNPTCB{
		"source":      nil,
		"destination": nil,
		// weak has older microcode than the default TCB: a policy requiring the
		// destination's TCB to be at least the source's refuses it as a destination.
		"weak": {BootLoader: 3, TEE: 0, SNP: 8, Microcode: 100},
	} {
		p, err := emulate.New(attest.PlatformEmulatedSEVSNP, emulate.Options{TCB: tcb})
		if err != nil {
			return nil, err
		}
		out[name] = p
	}
	return out, nil
})

// Platforms returns three emulated SEV-SNP platforms, made once per test binary: "source" and
// "destination" with the emulator's default TCB, and "weak", whose older microcode a policy
// that requires the destination's TCB to be at least the source's refuses as a destination.
// The map is shared: do not change it.
func Platforms(t testing.TB) map[string]emulate.Platform {
	t.Helper()
	plats, err := platforms()
	if err != nil {
		t.Fatalf("making emulated platforms: %v", err)
	}
	return plats
}

// Verifier returns a new verifier that trusts the roots of plats.
func Verifier(t testing.TB, plats map[string]emulate.Platform) *attest.Verifier {
	t.Helper()
	var roots []attest.Roots
	for _, p := range plats {
		roots = append(roots, p.Roots())
	}
	v, err := attest.NewVerifier(attest.Config{Roots: roots})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// DataEndpoint is the data endpoint CleanStatement names.
const DataEndpoint = "127.0.0.1:7000"

// CleanStatement returns the clean-memory statement of a destination that zeroed and read
// back 1 GiB and listens at DataEndpoint.
func CleanStatement(t testing.TB) []byte {
	t.Helper()
	b, err := attest.CleanMemoryStatement{Zeroed: true, VerifiedZero: true, Bytes: 1 << 30, DataEndpoint: DataEndpoint}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ErasureStatement returns the erasure statement of a source that ended migration id: every
// key zeroized, 1 GiB of pages and 4 KiB of spool scrubbed.
func ErasureStatement(t testing.TB, id string) []byte {
	t.Helper()
	b, err := attest.ErasureStatement{
		MigrationID: id, KeysZeroized: []string{attest.KeyTransfer, attest.KeyMemoryData, attest.KeyHPKE},
		PagesScrubbed: 262144, PageBytesScrubbed: 1 << 30, SpoolBytesScrubbed: 4096,
	}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// CommitAck returns an encoded commit acknowledgement of migration id MACed under tk, as the
// destination makes one (grant.CommitAck), over a transcript fixed by id.
func CommitAck(t testing.TB, tk []byte, id string) []byte {
	t.Helper()
	transcript := sha256.Sum256([]byte("transcript of " + id))
	mac, err := grant.CommitMAC(tk, id, transcript[:])
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(grant.CommitAck{MigrationID: id, Transcript: transcript[:], MAC: mac})
	if err != nil {
		t.Fatal(err)
	}
	return b
}
