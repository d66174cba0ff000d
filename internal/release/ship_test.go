package release

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lethe-cc/lethe/policy"
)

// requireTool returns the path of a tool the test needs. Where it is missing, the test skips
// on a developer's machine and, under CI=true, has script install it first.
func requireTool(t *testing.T, tool, script string) string {
	t.Helper()
	if p, err := exec.LookPath(tool); err == nil {
		return p
	}
	if os.Getenv("CI") != "true" {
		t.Skipf("%s is not installed: `bash %s` installs it (CI does)", tool, script)
	}
	if out, err := exec.Command("bash", filepath.Join("../..", script)).CombinedOutput(); err != nil {
		t.Fatalf("bash %s: %v\n%s", script, err, out)
	}
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s installed no %s: %v", script, tool, err)
	}
	return p
}

// TestSystemdUnits runs systemd-analyze verify on each unit of deploy/systemd, with its
// ExecStart pointing to a binary that exists (verify checks that it does).
func TestSystemdUnits(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze", "scripts/systemd-analyze.sh")
	units, err := filepath.Glob("../../deploy/systemd/*.service")
	if err != nil || len(units) != 3 {
		t.Fatalf("units %v (%v), want the three daemons'", units, err)
	}
	dir := t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, unit := range units {
		name := filepath.Base(unit)
		text, err := os.ReadFile(unit)
		if err != nil {
			t.Fatal(err)
		}
		bin := "/usr/local/bin/" + strings.TrimSuffix(name, ".service")
		if !strings.Contains(string(text), "ExecStart="+bin+" ") {
			t.Errorf("%s does not run %s", name, bin)
		}
		text = []byte(strings.ReplaceAll(string(text), "ExecStart="+bin, "ExecStart="+exe))
		if err := os.WriteFile(filepath.Join(dir, name), text, 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(analyze, "verify", "--man=no", filepath.Join(dir, name))
		out, err := cmd.CombinedOutput()
		// Lines naming other units (the network targets, libvirtd) are about this
		// machine, not the unit.
		var problems []string
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if line != "" && strings.Contains(line, name) {
				problems = append(problems, line)
			}
		}
		if err != nil || len(problems) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
		}
	}
}

// TestMakeRelease runs `make release` for this machine's platform and checks the release as a
// user would: the signature of SHA256SUMS, every checksum, the archive and the daemons' OCI
// images. It builds every binary afresh (a few minutes), so it runs under CI=true or
// LETHE_RELEASE_TEST=1 only.
func TestMakeRelease(t *testing.T) {
	if os.Getenv("CI") != "true" && os.Getenv("LETHE_RELEASE_TEST") != "1" {
		t.Skip("builds a whole release: set LETHE_RELEASE_TEST=1 (CI sets CI=true)")
	}
	dist := t.TempDir()
	platform := Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	cmd := exec.Command("make", "-C", "../..", "release", "DIST="+dist, "PLATFORMS="+platform.OS+"/"+platform.Architecture, "VERSION=v0.0.0-test")
	cmd.Env = append(os.Environ(), "LETHE_RELEASE_KEY=", "LETHE_RELEASE_PUB=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make release: %v\n%s", err, out)
	}
	pub, err := policy.ReadPublicKey("../../bin/release-key/release.pub")
	if err != nil {
		t.Fatal(err)
	}
	names, err := Verify(dist, pub)
	if err != nil {
		t.Fatalf("verifying the release: %v", err)
	}
	suffix := "-v0.0.0-test-" + platform.OS + "-" + platform.Architecture
	want := []string{"lethe" + suffix + ".tar.gz", "lethe" + suffix + ".cdx.json"}
	for _, d := range []string{"lethe-broker", "lethe-keybroker", "lethe-agent"} {
		want = append(want, d+suffix+".oci.tar")
	}
	for _, w := range want {
		if !strings.Contains(strings.Join(names, " "), w) {
			t.Errorf("SHA256SUMS lists %v, lacking %s", names, w)
		}
	}
	f, err := os.Open(filepath.Join(dist, "lethe-broker"+suffix+".oci.tar"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	epoch, err := exec.Command("git", "log", "-1", "--format=%ct").Output()
	if err != nil {
		t.Fatal(err)
	}
	sec, err := strconv.ParseInt(strings.TrimSpace(string(epoch)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	checkLayout(t, f, platform, "lethe-broker", time.Unix(sec, 0))
}
