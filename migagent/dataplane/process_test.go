package dataplane

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/lethe-cc/lethe/keybroker/seal"
)

// The destination agent of TestTwoProcesses runs in a child process: the test binary,
// re-executed with these variables set.
const (
	envChild   = "LETHE_MIGAGENT_TEST_CHILD"
	envSize    = "LETHE_MIGAGENT_TEST_SIZE"
	envTK      = "LETHE_MIGAGENT_TEST_TK"
	envMigID   = "LETHE_MIGAGENT_TEST_MIGRATION"
	envPeerKey = "LETHE_MIGAGENT_TEST_PEER_KEY" // the source's HPKE public key
	childAlive = "destination"
)

func TestMain(m *testing.M) {
	if os.Getenv(envChild) == childAlive {
		if err := childDestination(context.Background()); err != nil {
			fmt.Printf("ERR %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// childDestination makes its HPKE key, prepares a region, prints its public key and its data
// endpoint, receives one migration and prints the hash of every page it then holds.
func childDestination(ctx context.Context) error {
	peerKey, err := hex.DecodeString(os.Getenv(envPeerKey))
	if err != nil {
		return err
	}
	identity, err := seal.GenerateKey()
	if err != nil {
		return err
	}
	defer identity.Zeroize()
	size, err := strconv.ParseInt(os.Getenv(envSize), 10, 64)
	if err != nil {
		return err
	}
	tkBytes, err := hex.DecodeString(os.Getenv(envTK))
	if err != nil {
		return err
	}
	tk, err := NewSecretKey(tkBytes)
	clear(tkBytes)
	if err != nil {
		return err
	}
	region, err := NewRegion(size)
	if err != nil {
		return err
	}
	fillRegion(region, 99) // a previous tenant's memory
	dst, err := NewDestination(DestinationConfig{MigrationID: os.Getenv(envMigID), Region: region})
	if err != nil {
		return err
	}
	clean, err := dst.Prepare(ctx)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Printf("KEY %x\n", identity.PublicKey())
	fmt.Printf("ADDR %s\n", ln.Addr())
	res, err := dst.Receive(ctx, ln, Keys{TK: tk, Identity: identity, PeerKey: peerKey})
	if err != nil {
		return err
	}
	h := regionHash(region)
	fmt.Printf("CLEAN %v %v %d\n", clean.Zeroed, clean.VerifiedZero, clean.Bytes)
	fmt.Printf("HASH %x\n", h)
	fmt.Printf("COMMIT %x\n", res.Commit.MAC)
	return nil
}

func TestTwoProcesses1GiB(t *testing.T) {
	const size = 1 << 30
	tkBytes := testKeyBytes(42)
	identity := testIdentity(t)
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"="+childAlive, envSize+"="+strconv.Itoa(size),
		envTK+"="+hex.EncodeToString(tkBytes), envMigID+"=mig-1gib", envPeerKey+"="+hex.EncodeToString(identity.PublicKey()))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	lines := bufio.NewScanner(out)
	next := func(key string) string {
		t.Helper()
		for lines.Scan() {
			f := strings.Fields(lines.Text())
			if len(f) >= 2 && f[0] == key {
				return strings.Join(f[1:], " ")
			}
			if len(f) > 0 && f[0] == "ERR" {
				t.Fatalf("destination process: %s", lines.Text())
			}
		}
		t.Fatalf("destination process ended before %s: %v", key, lines.Err())
		return ""
	}

	region := testRegion(t, size)
	fillRegion(region, 1)
	w, err := NewWorkload(WorkloadConfig{Region: region, Rate: 50000, Pattern: Hotspot, Seed: 7})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(t.Context())
	defer stop()
	go w.Run(ctx)
	pauser := &hashingPauser{w: w, r: region}
	peerKey, err := hex.DecodeString(next("KEY"))
	if err != nil {
		t.Fatal(err)
	}
	addr := next("ADDR")
	src, err := NewSource(SourceConfig{
		MigrationID: "mig-1gib", Peer: addr, Streams: 2, Region: region, Guest: pauser,
		MaxRounds: 6, ConvergedPages: 2048,
		Progress: func(p Progress) {
			t.Logf("round %d final=%v pages=%d dirty=%d rate=%.0f MB/s dirty-rate=%.0f pages/s eta=%v",
				p.Round, p.Final, p.Pages, p.Dirty, p.Rate/1e6, p.DirtyRate, p.ETA)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	tk := testKey(t, 42)
	res, err := src.Run(t.Context(), Keys{TK: tk, Identity: identity, PeerKey: peerKey})
	if err != nil {
		t.Fatalf("source: %v", err)
	}
	if got := next("CLEAN"); got != fmt.Sprintf("true true %d", size) {
		t.Errorf("clean-memory statement: %s", got)
	}
	if got, want := next("HASH"), fmt.Sprintf("%x", pauser.hash); got != want {
		t.Fatalf("destination memory hash %s, source at cutover %s", got, want)
	}
	if got, want := next("COMMIT"), fmt.Sprintf("%x", res.Commit.MAC); got != want {
		t.Errorf("commit MAC: destination %s, source %s", got, want)
	}
	if w.Written() == 0 || len(res.Rounds) < 2 {
		t.Errorf("workload wrote %d pages over %d rounds: not a live migration", w.Written(), len(res.Rounds))
	}
	if res.Erasure.PageBytesScrubbed != size {
		t.Errorf("erasure: %+v", res.Erasure)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("destination process: %v", err)
	}
}
