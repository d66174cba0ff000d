package migagent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/migagent/agentapi"
	"github.com/lethe-cc/lethe/migagent/dataplane"
)

// GuestSpec is a guest the agent holds from the start.
type GuestSpec struct {
	// Tenant and VM name the guest; both must be valid names (agentapi.ValidName).
	Tenant, VM string
	// MemoryBytes is the size of an in-process guest, a positive multiple of the page size.
	// Ignored when File is set.
	MemoryBytes int64
	// File, if set, is a guest RAM file mapped as the guest's memory (its size is the guest's).
	File string
}

// ParseGuestSpec parses "tenant/vm=SIZE" (SIZE like 256MiB, 1GiB, 65536) or
// "tenant/vm=file:PATH".
func ParseGuestSpec(s string) (GuestSpec, error) {
	name, size, ok := strings.Cut(s, "=")
	tenant, vm, ok2 := strings.Cut(name, "/")
	if !ok || !ok2 {
		return GuestSpec{}, fmt.Errorf("parsing guest %q: want tenant/vm=SIZE or tenant/vm=file:PATH", s)
	}
	g := GuestSpec{Tenant: tenant, VM: vm}
	if err := errors.Join(agentapi.ValidName(tenant), agentapi.ValidName(vm)); err != nil {
		return GuestSpec{}, fmt.Errorf("parsing guest %q: %w", s, err)
	}
	if path, ok := strings.CutPrefix(size, "file:"); ok {
		if path == "" {
			return GuestSpec{}, fmt.Errorf("parsing guest %q: empty file path", s)
		}
		g.File = path
		return g, nil
	}
	n, err := ParseSize(size)
	if err != nil {
		return GuestSpec{}, fmt.Errorf("parsing guest %q: %w", s, err)
	}
	g.MemoryBytes = n
	return g, nil
}

// String formats g as ParseGuestSpec reads it.
func (g GuestSpec) String() string {
	if g.File != "" {
		return g.Tenant + "/" + g.VM + "=file:" + g.File
	}
	return g.Tenant + "/" + g.VM + "=" + strconv.FormatInt(g.MemoryBytes, 10)
}

// ParseSize parses a memory size: a number of bytes with an optional binary suffix (KiB, MiB,
// GiB, TiB). The result must be a positive multiple of the page size.
func ParseSize(s string) (int64, error) {
	mult := int64(1)
	num := s
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			num, mult = v, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || n > (1<<50)/mult {
		return 0, fmt.Errorf("size %q: want a positive number with an optional KiB, MiB, GiB or TiB suffix", s)
	}
	n *= mult
	if n%dataplane.PageSize != 0 {
		return 0, fmt.Errorf("size %q is not a multiple of the %d-byte page", s, dataplane.PageSize)
	}
	return n, nil
}

// guest is a guest the node holds: its memory, the workload that runs it, and its memory
// data key. Fields other than the immutable ones are guarded by Node.mu.
type guest struct {
	tenant, vm string
	region     *dataplane.Region
	workload   *dataplane.Workload
	// domain is the libvirt domain of a libvirt guest, which has no region and no workload;
	// memory is its size. Empty for other guests.
	domain string
	memory int64
	// stop ends the workload's goroutine and waits for it; nil while it does not run.
	stop func()
	// mdk is the memory data key of the guest's current residency on this host; nil before
	// adoption. epoch is its residency epoch, 0 if unknown.
	mdk   *dataplane.SecretKey
	epoch uint64
	// migration is the id of the migration taking the guest away, if any.
	migration string
	// launch is the encoded clean-memory statement of the memory the guest started in on
	// this host (a region scrubbed before launch, or the receive region of its migration),
	// stated in adoption evidence; nil for a guest RAM file the agent did not scrub.
	launch []byte
}

func guestKey(tenant, vm string) string { return tenant + "/" + vm }

func (g *guest) key() string { return guestKey(g.tenant, g.vm) }

// openGuest makes the memory of a guest from its spec. An in-process guest starts with every
// page stamped with its index, so that its memory is not all zero.
func openGuest(spec GuestSpec, rate int) (*guest, error) {
	var r *dataplane.Region
	var launch []byte
	var err error
	if spec.File != "" {
		r, err = dataplane.OpenRegionFile(spec.File)
	} else {
		r, err = dataplane.NewRegion(spec.MemoryBytes)
		if err == nil {
			launch, err = launchClean(r)
		}
		if err == nil {
			for i := range r.Pages() {
				binary.LittleEndian.PutUint64(r.Page(i), uint64(i)+1)
			}
		}
	}
	if err != nil {
		if r != nil {
			r.Close()
		}
		return nil, fmt.Errorf("making guest %s/%s: %w", spec.Tenant, spec.VM, err)
	}
	g, err := newGuest(spec.Tenant, spec.VM, r, rate)
	if err != nil {
		r.Close()
		return nil, err
	}
	g.launch = launch
	return g, nil
}

// launchClean scrubs a new guest's region before the guest starts and returns the encoded
// clean-memory statement of that launch.
func launchClean(r *dataplane.Region) ([]byte, error) {
	n, err := r.Scrub()
	if err != nil {
		return nil, fmt.Errorf("scrubbing guest memory before launch: %w", err)
	}
	return attest.CleanMemoryStatement{Zeroed: true, VerifiedZero: true, Bytes: uint64(n)}.Encode()
}

// newGuest wraps region in a guest with a workload of rate page writes per second (negative:
// a workload that never writes, still usable to pause and resume).
func newGuest(tenant, vm string, region *dataplane.Region, rate int) (*guest, error) {
	w, err := dataplane.NewWorkload(dataplane.WorkloadConfig{Region: region, Rate: max(rate, 1), Pattern: dataplane.Hotspot})
	if err != nil {
		return nil, fmt.Errorf("making workload of %s/%s: %w", tenant, vm, err)
	}
	return &guest{tenant: tenant, vm: vm, region: region, workload: w}, nil
}
