// Command guestload is the init of the Linux guest that the libvirt tests migrate: the only
// program of its initramfs, it runs as PID 1 under a Debian kernel and turns the guest into a
// witness of its own memory.
//
// It maps an anonymous region, writes every 4 KiB page of it once, then goes on rewriting
// pages at a steady rate while it sweeps the region and checks each page against what it last
// wrote there. A page's content is a function of its number and of a generation the program
// keeps per page, so a check finds any page that does not hold exactly its last write: a page
// a migration lost, or one that arrived from an earlier round (stale). On the serial console
// it prints, for the tests to read:
//
//	lethe-guest: ready pages=N
//	lethe-guest: alive n=WRITES t=SECONDS sweep=K
//	lethe-guest: verified N pages, B bad (sweep K)
//	lethe-guest: bad page p=P want gen=G found gen=F page=Q
//
// Its settings come from the kernel command line, which passes parameters it does not know
// to init's environment: lethe_mem_mib (the region, default 768), lethe_rate (pages rewritten
// a second, default 4096), lethe_verify_rate (pages checked a second, default 65536).
//
// It must never exit: the kernel panics when init does. It needs no file system but the
// /dev/console of its initramfs, no network and no other program.
package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"
)

const (
	pageSize  = 4096
	pageWords = pageSize / 8
	// tick is how often the program writes and checks its share of pages.
	tick = 10 * time.Millisecond
	// maxBadReported bounds the bad-page lines of one sweep.
	maxBadReported = 8
)

func main() {
	memMiB := setting("lethe_mem_mib", 768)
	rate := setting("lethe_rate", 4096)
	verifyRate := setting("lethe_verify_rate", 65536)
	if err := run(memMiB, rate, verifyRate); err != nil {
		say("lethe-guest: failed: %v", err)
	}
	for {
		time.Sleep(time.Hour)
	}
}

func setting(name string, def int) int {
	v, err := strconv.Atoi(os.Getenv(name))
	if err != nil || v <= 0 {
		return def
	}
	return v
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stdout, format+"\r\n", args...)
}

// region is the memory the program witnesses: pages of words, and the generation each page
// was last written with.
type region struct {
	words []uint64
	gen   []uint32
}

func run(memMiB, rate, verifyRate int) error {
	size := memMiB << 20
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mapping %d MiB: %w", memMiB, err)
	}
	r := &region{
		words: unsafe.Slice((*uint64)(unsafe.Pointer(&mem[0])), size/8),
		gen:   make([]uint32, size/pageSize),
	}
	pages := len(r.gen)
	for p := range pages {
		r.write(p)
	}
	say("lethe-guest: ready pages=%d mem=%dMiB rate=%d verify_rate=%d", pages, memMiB, rate, verifyRate)

	start := time.Now()
	var written, checked int64 // pages due so far, by elapsed time
	var writes int64
	w, v := 0, 0 // cursors
	sweep, bad, reported := 1, 0, 0
	lastAlive := start
	t := time.NewTicker(tick)
	defer t.Stop()
	for now := range t.C {
		el := now.Sub(start).Seconds()
		// Catch up with the rate, but never more than a second's worth at once: a guest paused
		// for a cutover must not then rewrite its whole memory in one go.
		dueW := min(int64(el*float64(rate))-written, int64(rate))
		dueV := min(int64(el*float64(verifyRate))-checked, int64(verifyRate))
		written += max(dueW, 0)
		checked += max(dueV, 0)
		for range dueW {
			r.write(w)
			writes++
			w = (w + 1) % pages
		}
		for range dueV {
			if g, p := r.check(v); g != r.gen[v] || p != uint32(v) {
				bad++
				if reported < maxBadReported {
					reported++
					say("lethe-guest: bad page p=%d want gen=%d found gen=%d page=%d", v, r.gen[v], g, p)
				}
			}
			v++
			if v == pages {
				say("lethe-guest: verified %d pages, %d bad (sweep %d)", pages, bad, sweep)
				v, bad, reported = 0, 0, 0
				sweep++
			}
		}
		if now.Sub(lastAlive) >= time.Second {
			lastAlive = now
			say("lethe-guest: alive n=%d t=%d sweep=%d", writes, int(el), sweep)
		}
	}
	return nil
}

// write gives page p its next generation.
func (r *region) write(p int) {
	r.gen[p]++
	head := uint64(p)<<32 | uint64(r.gen[p])
	x, k := mix(head), mix(^head)|1
	ws := r.words[p*pageWords : (p+1)*pageWords]
	ws[0] = head
	for i := 1; i < len(ws); i++ {
		x += k
		ws[i] = x
	}
}

// check reads page p: the generation and page number its first word names if the rest of the
// page is what a write of them leaves, else (0, p) and a generation no write gives.
func (r *region) check(p int) (gen, page uint32) {
	ws := r.words[p*pageWords : (p+1)*pageWords]
	head := ws[0]
	x, k := mix(head), mix(^head)|1
	for i := 1; i < len(ws); i++ {
		x += k
		if ws[i] != x {
			return 0, uint32(p)
		}
	}
	return uint32(head), uint32(head >> 32)
}

// mix is splitmix64's finaliser.
func mix(z uint64) uint64 {
	z += 0x9e3779b97f4a7c15
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}
