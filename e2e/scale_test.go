package e2e

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/lethe-cc/lethe/broker"
)

// scaleStacks are the stacks BenchmarkScale measures, each started once and then loaded at
// every level of scaleLevels in turn.
var scaleStacks = []struct {
	name  string
	start func(testing.TB) *env
}{
	{"single", func(tb testing.TB) *env { return withScaleBrokers(newEnv(tb)) }},
	// Three nats-server processes with R3 buckets, Vault HA, two keybroker processes.
	{"cluster", func(tb testing.TB) *env { return withScaleBrokers(newCluster(tb).env) }},
	// The same, its brokers listing the migrations bucket at every check instead of reading
	// the view their watch keeps (as every check did before the view): the baseline of the
	// cluster's row.
	{"cluster-listing-each-check", func(tb testing.TB) *env {
		return withScaleBrokers(newCluster(tb).env, "--relist-interval", "1ns")
	}},
}

// scaleLevels are the numbers of migrations BenchmarkScale starts at once.
var scaleLevels = []int{50, 200, 1000}

const (
	// scaleAgents is how many agents share a level's guests and migrations.
	scaleAgents = 4
	// scaleGuestSize is the memory of a scale guest: small, so that the control plane, not
	// the data plane, is what is measured.
	scaleGuestSize = "1MiB"
	// scaleWorkloadRate is the page-write rate of each scale guest: a workload that keeps
	// pre-copy honest without a thousand guests' writes filling two cores.
	scaleWorkloadRate = "20"
	// scaleAdopters and scaleSubmitters bound the adoption and creation requests in flight at
	// once: below the broker's 64 concurrent API requests each (it answers busy beyond them),
	// so that a level's errors are the migrations', not the harness's pace.
	scaleAdopters   = 8
	scaleSubmitters = 16
)

// scaleBrokerFlags restore the broker's shipped timeouts, host TTL and check interval over the
// short ones the suite's scenarios use: a queue of a thousand migrations would otherwise run
// into a 30 s start timeout, and reconcile every 200 ms, that no deployment has; and an agent
// starved of CPU for 4 s would count as lost. (A level's destinations are named, so hosts of
// an earlier level that still count as live for the longer TTL take no part.)
var scaleBrokerFlags = []string{
	"--lease", "15s", "--check-interval", "1s", "--agent-timeout", "30s",
	"--start-timeout", "120s", "--progress-timeout", "150s", "--host-ttl", "30s",
}

// withScaleBrokers restarts e's brokers with scaleBrokerFlags and extra (the last value of a
// flag wins).
func withScaleBrokers(e *env, extra ...string) *env {
	e.t.Helper()
	e.mu.Lock()
	procs := make([]*proc, 0, len(e.brokers))
	for _, p := range e.brokers {
		procs = append(procs, p)
	}
	e.mu.Unlock()
	for _, p := range procs {
		p.stop()
		p.args = append(append(p.args, scaleBrokerFlags...), extra...)
		e.start(p)
	}
	e.waitBuckets()
	return e
}

// BenchmarkScale starts n migrations of 1 MiB guests at once, for n in scaleLevels, on each
// stack of scaleStacks: four agents hold the n guests (adopted first), and every agent's
// guests move to the next agent, so that every host is the source of n/4 migrations and the
// destination of n/4. One watch over the migrations bucket sees them end. It reports
// migrations erased per second (from the first request to the last erasure), p50 and p99 of
// each migration's time from its request to its erasure, the errors (a refused request, a
// migration that did not end erased, or one that did not end in time: the benchmark fails on
// any, with the first one's text), and the peak RSS and the CPU time of each kind of process
// during the level: the keybroker runs in the test's own process (with NATS, on the
// single-node stack), whose figures are keybroker-e2e-*; every child process (brokers, agents,
// Vault, and whatever else a stack runs) is measured under the name of its command. It logs
// where the time went: each phase's p50 and p99, the brokers' warnings, the errors by kind.
//
// Run it with -benchtime 1x: an iteration is a whole level.
func BenchmarkScale(b *testing.B) {
	for _, stack := range scaleStacks {
		b.Run(stack.name, func(b *testing.B) {
			e := stack.start(b)
			for _, n := range scaleLevels {
				b.Run(fmt.Sprintf("inflight=%d", n), func(b *testing.B) {
					var sum scaleResult
					for range b.N {
						b.StopTimer()
						r := runScaleLevel(b, e, n)
						b.StartTimer()
						sum.add(r)
					}
					sum.report(b, n)
				})
			}
		})
	}
}

// scaleResult is what one level measured.
type scaleResult struct {
	elapsed   time.Duration
	erased    int
	durations []time.Duration // request to erasure, of each erased migration
	// phases are the times erased migrations spent in each phase.
	phases map[broker.Phase][]time.Duration
	// submit is how long the requests that created the migrations took, all of them.
	submit time.Duration
	errs   []string
	rss    map[string]float64 // peak MiB by process kind
	cpu    map[string]float64 // CPU seconds by process kind
}

func (r *scaleResult) add(o scaleResult) {
	r.elapsed += o.elapsed
	r.erased += o.erased
	r.durations = append(r.durations, o.durations...)
	r.errs = append(r.errs, o.errs...)
	r.submit += o.submit
	if r.phases == nil {
		r.phases = map[broker.Phase][]time.Duration{}
	}
	for p, d := range o.phases {
		r.phases[p] = append(r.phases[p], d...)
	}
	for _, m := range []*map[string]float64{&r.rss, &r.cpu} {
		if *m == nil {
			*m = map[string]float64{}
		}
	}
	for k, v := range o.rss {
		r.rss[k] = max(r.rss[k], v)
	}
	for k, v := range o.cpu {
		r.cpu[k] += v
	}
}

// report reports r's metrics, logs them (a failed benchmark prints no metrics line), and
// fails b with the first error if there was any.
func (r *scaleResult) report(b *testing.B, n int) {
	b.Helper()
	slices.Sort(r.durations)
	metrics := map[string]float64{
		"erased/s": float64(r.erased) / r.elapsed.Seconds(),
		"p50-s":    quantile(r.durations, 0.50).Seconds(),
		"p99-s":    quantile(r.durations, 0.99).Seconds(),
		"errors":   float64(len(r.errs)),
	}
	for k, v := range r.rss {
		metrics[k+"-rss-MiB"] = v
	}
	for k, v := range r.cpu {
		metrics[k+"-cpu-s"] = v
	}
	var line []string
	for _, k := range slices.Sorted(maps.Keys(metrics)) {
		b.ReportMetric(metrics[k], k)
		line = append(line, fmt.Sprintf("%s=%.3g", k, metrics[k]))
	}
	b.ReportMetric(0, "ns/op")
	b.Logf("%d in flight: %d erased in %v (requests took %v); %s", n, r.erased, r.elapsed.Round(time.Millisecond),
		r.submit.Round(time.Millisecond), strings.Join(line, " "))
	var phases []string
	for _, p := range []broker.Phase{broker.PhaseRequested, broker.PhaseAttesting, broker.PhaseKeysReleased,
		broker.PhaseTransferring, broker.PhaseCuttingOver, broker.PhaseCommitted} {
		d := r.phases[p]
		slices.Sort(d)
		phases = append(phases, fmt.Sprintf("%s %.2g/%.2g", p, quantile(d, 0.5).Seconds(), quantile(d, 0.99).Seconds()))
	}
	b.Logf("%d in flight: seconds in each phase, p50/p99: %s", n, strings.Join(phases, ", "))
	for _, c := range errorKinds(r.errs) {
		b.Logf("%d in flight: errors: %s", n, c)
	}
	if len(r.errs) > 0 {
		b.Errorf("%d errors of %d migrations; the first: %s", len(r.errs), n, r.errs[0])
	}
}

// errorKinds counts errs by their text with the names of migrations, guests and hosts
// taken out, most frequent first, each with its first error.
func errorKinds(errs []string) []string {
	names := regexp.MustCompile(`mig-[0-9A-Z]+|scale-[0-9]+-[0-9]+|\bh[0-9]{3}\b|[0-9]+(\.[0-9]+)?(ms|s|m)\b`)
	counts, first := map[string]int{}, map[string]string{}
	for _, e := range errs {
		k := names.ReplaceAllString(e, "…")
		if counts[k] == 0 {
			first[k] = e
		}
		counts[k]++
	}
	var out []string
	for _, k := range slices.SortedFunc(maps.Keys(counts), func(a, b string) int { return counts[b] - counts[a] }) {
		out = append(out, fmt.Sprintf("%d× %s", counts[k], first[k]))
	}
	return out
}

// quantile returns the q quantile of sorted d, or zero if d is empty.
func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[min(len(d)-1, int(q*float64(len(d))))]
}

// scaleWait bounds the wait for a level's n migrations to end.
func scaleWait(n int) time.Duration {
	return 2*time.Minute + time.Duration(n)*200*time.Millisecond
}

// runScaleLevel starts four agents with n guests between them, adopts the guests, then starts
// their n migrations and waits for all of them to end. The agents are stopped when it
// returns, so the next level starts on four fresh hosts.
func runScaleLevel(b *testing.B, e *env, n int) scaleResult {
	b.Helper()
	run := benchRuns.Add(1) // guest names stay unique across levels and runs on one stack
	e.awaitQuiet(b)
	vms := make([][]string, scaleAgents)
	for g := range n {
		i := g % scaleAgents
		vms[i] = append(vms[i], fmt.Sprintf("scale-%d-%04d", run, g))
	}
	agents := make([]*agent, scaleAgents)
	for i := range agents {
		spec := snp(snpBase, vms[i]...)
		spec.size = scaleGuestSize
		// Its own guests and as many arriving: room for both, and to spare.
		spec.allocatable = fmt.Sprintf("%dMiB", n+64)
		spec.extra = []string{"--workload-rate", scaleWorkloadRate}
		agents[i] = e.startAgent(b, spec)
	}
	defer func() {
		for _, a := range agents {
			a.proc.stop()
		}
	}()
	adoptAll(b, e, agents)

	// Every agent's guests to the next agent, interleaved so that every host is busy from
	// the start.
	type job struct{ vm, dest string }
	var jobs []job
	for g := range n {
		i := g % scaleAgents
		jobs = append(jobs, job{vms[i][g/scaleAgents], agents[(i+1)%scaleAgents].host})
	}

	w := watchEnds(b, e)
	defer w.stop()
	procs := scaleProcs()
	marks := markLogs(e)
	sampler := startSampler(procs)

	var (
		mu      sync.Mutex
		errs    []string
		started = map[string]time.Time{} // migration id → its request
		vmOf    = map[string]string{}
	)
	fail := func(s string) {
		mu.Lock()
		errs = append(errs, s)
		mu.Unlock()
	}
	begin := time.Now()
	queue := make(chan job)
	var wg sync.WaitGroup
	for range scaleSubmitters {
		wg.Go(func() {
			for j := range queue {
				at := time.Now()
				resp, err := e.demo.CreateMigration(b.Context(), &broker.CreateMigrationRequest{VM: j.vm, Destination: j.dest})
				if err != nil {
					fail(fmt.Sprintf("migrating %s to %s: %v", j.vm, j.dest, err))
					continue
				}
				mu.Lock()
				started[resp.Migration.ID] = at
				vmOf[resp.Migration.ID] = j.vm
				mu.Unlock()
			}
		})
	}
	for _, j := range jobs {
		queue <- j
	}
	close(queue)
	wg.Wait()
	submit := time.Since(begin)

	ids := slices.Collect(maps.Keys(started))
	deadline := time.After(scaleWait(n))
wait:
	for !w.ended(ids) {
		select {
		case <-w.changed:
		case <-deadline:
			break wait
		case <-b.Context().Done():
			b.Fatal("the benchmark ended before its migrations")
		}
	}
	usage := sampler.stop()
	r := scaleResult{rss: usage.rss, cpu: usage.cpu, submit: submit, phases: map[broker.Phase][]time.Duration{}}
	var last time.Time
	slices.Sort(ids)
	for _, id := range ids {
		end, ok := w.end(id)
		switch {
		case !ok:
			fail(fmt.Sprintf("migration %s of %s: not ended within %v; phase %s", id, vmOf[id], scaleWait(n), end.phase))
		case end.outcome != broker.OutcomeErased:
			fail(fmt.Sprintf("migration %s of %s ended %s: %s", id, vmOf[id], end.outcome, end.reason))
		default:
			r.erased++
			r.durations = append(r.durations, end.at.Sub(started[id]))
			for _, p := range end.timeline {
				r.phases[p.Phase] = append(r.phases[p.Phase], p.Duration)
			}
			last = later(last, end.at)
		}
	}
	r.elapsed = last.Sub(begin)
	for _, w := range marks.warnings() {
		b.Logf("%d in flight: brokers logged %s", n, w)
	}
	r.errs = errs
	return r
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// adoptAll adopts every agent's guests, a few requests at a time.
func adoptAll(b *testing.B, e *env, agents []*agent) {
	b.Helper()
	type job struct{ vm, host string }
	queue := make(chan job)
	var (
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
	)
	for range scaleAdopters {
		wg.Go(func() {
			for j := range queue {
				if _, err := e.demo.AdoptGuest(b.Context(), &broker.AdoptGuestRequest{VM: j.vm, Host: j.host}); err != nil {
					mu.Lock()
					first = cmp.Or(first, fmt.Errorf("adopting %s on %s: %w", j.vm, j.host, err))
					mu.Unlock()
				}
			}
		})
	}
	for _, a := range agents {
		for _, vm := range a.spec.guests {
			queue <- job{vm, a.host}
		}
	}
	close(queue)
	wg.Wait()
	if first != nil {
		b.Fatal(first)
	}
}

// endWatch follows every migration record through one watch of the bucket and remembers how
// each migration ended.
type endWatch struct {
	w       jetstream.KeyWatcher
	changed chan struct{} // a migration ended
	done    chan struct{}

	mu   sync.Mutex
	ends map[string]migrationEnd
}

// migrationEnd is the last phase seen of a migration and, once it ended, how and when.
type migrationEnd struct {
	phase   broker.Phase
	outcome string
	reason  string
	at      time.Time // when the watch saw it end; zero while it runs
	// timeline is the ended migration's phases and the time it spent in each.
	timeline []broker.PhaseEntry
}

// watchEnds watches the migrations bucket for updates from now on.
func watchEnds(b *testing.B, e *env) *endWatch {
	b.Helper()
	kv, err := e.js.KeyValue(b.Context(), broker.MigrationsBucket)
	if err != nil {
		b.Fatal(err)
	}
	kw, err := kv.WatchAll(b.Context(), jetstream.UpdatesOnly())
	if err != nil {
		b.Fatalf("watching %s: %v", broker.MigrationsBucket, err)
	}
	w := &endWatch{w: kw, changed: make(chan struct{}, 1), done: make(chan struct{}), ends: map[string]migrationEnd{}}
	go w.follow()
	return w
}

func (w *endWatch) follow() {
	defer close(w.done)
	for entry := range w.w.Updates() {
		if entry == nil || entry.Operation() != jetstream.KeyValuePut {
			continue
		}
		// Only what the benchmark needs of the record: decoding whole records would make the
		// harness a large part of what it measures.
		var m struct {
			ID          string       `json:"id"`
			Phase       broker.Phase `json:"phase"`
			Outcome     string       `json:"outcome"`
			AbortReason string       `json:"abortReason"`
			// Timeline is decoded too but kept only from the record that ends a migration.
			Timeline []broker.PhaseEntry `json:"timeline"`
		}
		if json.Unmarshal(entry.Value(), &m) != nil {
			continue
		}
		end := migrationEnd{phase: m.Phase, outcome: m.Outcome, reason: m.AbortReason}
		if m.Phase.Terminal() {
			end.at = time.Now()
			end.timeline = m.Timeline
		}
		w.mu.Lock()
		if prev := w.ends[m.ID]; prev.at.IsZero() {
			w.ends[m.ID] = end
		}
		w.mu.Unlock()
		if !end.at.IsZero() {
			select {
			case w.changed <- struct{}{}:
			default:
			}
		}
	}
}

// ended reports whether every migration of ids ended.
func (w *endWatch) ended(ids []string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, id := range ids {
		if w.ends[id].at.IsZero() {
			return false
		}
	}
	return true
}

// end returns how migration id ended; ok is false if it has not.
func (w *endWatch) end(id string) (migrationEnd, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	end := w.ends[id]
	return end, !end.at.IsZero()
}

func (w *endWatch) stop() {
	_ = w.w.Stop()
	<-w.done
}

// scaleProc is a process whose resources a level measures, by kind.
type scaleProc struct {
	kind string
	pid  int
}

// scaleProcs lists this process (keybroker-e2e: the keybroker, the harness and, on the
// single-node stack, NATS) and its children (brokers, agents, Vault, and whatever else a
// stack runs as processes), each of the kind its command names.
func scaleProcs() []scaleProc {
	out := []scaleProc{{"keybroker-e2e", os.Getpid()}}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(b)
		lp, rp := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if lp < 0 || rp < lp {
			continue
		}
		f := strings.Fields(s[rp+1:])
		if len(f) < 2 || f[1] != strconv.Itoa(os.Getpid()) {
			continue
		}
		out = append(out, scaleProc{strings.TrimPrefix(s[lp+1:rp], "lethe-"), pid})
	}
	return out
}

// sampler samples the RSS of processes every 200 ms and measures their CPU time.
type sampler struct {
	procs []scaleProc
	cpu0  []float64
	quit  chan struct{}
	done  chan struct{}
	peak  []float64 // MiB, by index of procs
}

func startSampler(procs []scaleProc) *sampler {
	s := &sampler{procs: procs, peak: make([]float64, len(procs)), quit: make(chan struct{}), done: make(chan struct{})}
	for _, p := range procs {
		s.cpu0 = append(s.cpu0, cpuSeconds(p.pid))
	}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			for i, p := range s.procs {
				s.peak[i] = max(s.peak[i], rssMiB(p.pid))
			}
			select {
			case <-s.quit:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// usage is the resources of a level by process kind: the peak RSS of the kind's largest
// process, and the CPU time of all its processes.
type usage struct {
	rss, cpu map[string]float64
}

func (s *sampler) stop() usage {
	close(s.quit)
	<-s.done
	u := usage{rss: map[string]float64{}, cpu: map[string]float64{}}
	for i, p := range s.procs {
		u.rss[p.kind] = max(u.rss[p.kind], s.peak[i])
		u.cpu[p.kind] += cpuSeconds(p.pid) - s.cpu0[i]
	}
	return u
}

// rssMiB reads a process's resident set size from /proc; zero if it cannot.
func rssMiB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// cpuSeconds reads a process's user and system CPU time from /proc; zero if it cannot.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command's closing parenthesis; utime and stime are the 12th and 13th,
	// in clock ticks (100 a second on Linux).
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100
}

// logMarks remembers where each broker's log ended, so that a level's warnings can be read.
type logMarks map[string]int64

func markLogs(e *env) logMarks {
	marks := logMarks{}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, p := range e.brokers {
		if fi, err := os.Stat(p.log); err == nil {
			marks[p.log] = fi.Size()
		}
	}
	return marks
}

// warnings counts the warnings and errors the brokers logged since the marks, by message, each
// with the first one's error.
func (marks logMarks) warnings() []string {
	type count struct {
		n     int
		first string
	}
	counts := map[string]*count{}
	for path, off := range marks {
		b, err := os.ReadFile(path)
		if err != nil || int64(len(b)) < off {
			continue
		}
		for line := range strings.Lines(string(b[off:])) {
			var rec struct{ Level, Msg, Error string }
			if json.Unmarshal([]byte(line), &rec) != nil || (rec.Level != "WARN" && rec.Level != "ERROR") {
				continue
			}
			c := counts[rec.Msg]
			if c == nil {
				c = &count{first: rec.Error}
				counts[rec.Msg] = c
			}
			c.n++
		}
	}
	var out []string
	for _, msg := range slices.SortedFunc(maps.Keys(counts), func(a, b string) int { return counts[b].n - counts[a].n }) {
		out = append(out, fmt.Sprintf("%d× %s (first: %s)", counts[msg].n, msg, counts[msg].first))
	}
	return out
}
