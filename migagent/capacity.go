package migagent

import (
	"bufio"
	"context"
	"os"
	"strconv"
	"strings"

	"github.com/lethe-cc/lethe/attest"
)

// hostMemory returns the host's MemTotal from /proc/meminfo in bytes, or 0 where it cannot be
// read.
func hostMemory() uint64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:")
		if !ok {
			continue
		}
		kib, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			return 0
		}
		return kib << 10
	}
	return 0
}

// readTCB reads the TCB level the host's evidence reports, for its record: evidence over an
// all-zero REPORT_DATA, which binds nothing and so can release nothing. A failure leaves the
// TCB unknown; placement then ranks the host after those whose TCB is known to suffice.
func (n *Node) readTCB(ctx context.Context) {
	var zero [attest.ReportDataSize]byte
	raw, err := n.cfg.Attester.Attest(ctx, zero)
	if err == nil {
		var t attest.HostTCB
		if t, err = attest.PeekTCB(&attest.Evidence{Platform: n.cfg.Attester.Platform(), Raw: raw}); err == nil {
			n.mu.Lock()
			n.tcb = &t
			n.mu.Unlock()
			return
		}
	}
	n.log.Warn("Reading the host's TCB failed; its record states none", attrError, err)
}
