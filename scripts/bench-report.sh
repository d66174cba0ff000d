#!/usr/bin/env bash
# bench-report.sh runs the data-plane benchmarks of migagent/dataplane (BenchmarkTransfer,
# BenchmarkAESGCM and BenchmarkDowntime) and writes the "Data plane" section of BENCHMARKS.md:
# median MB/s of each sub-benchmark over COUNT runs, the ratios the data plane is held to, the
# downtime of migrations of 256 MiB to 2 GiB beside the full-hash baseline, and the machine.
#
# Environment: COUNT (default 5), BENCHTIME (default 2s), DOWNTIME_COUNT (default COUNT; each
# run migrates 6.5 GiB in all and needs about 5 GiB of free memory), OUT (default
# BENCHMARKS.md at the repository root). Other sections of OUT are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

count=${COUNT:-5}
benchtime=${BENCHTIME:-2s}
out=${OUT:-BENCHMARKS.md}
raw=$(mktemp)
trap 'rm -f "$raw" "$raw.section" "$raw.rest"' EXIT

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
go test -run '^$' -bench 'BenchmarkTransfer|BenchmarkAESGCM' -benchtime "$benchtime" -count "$count" ./migagent/dataplane/ | tee "$raw"
go test -run '^$' -bench 'BenchmarkDowntime' -benchtime 1x -count "${DOWNTIME_COUNT:-$count}" -timeout 60m ./migagent/dataplane/ | tee -a "$raw"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# median NAME COLUMN-UNIT: the median of the value before UNIT on the lines of NAME.
median() {
	awk -v name="$1" -v unit="$2" '{
		n = $1; sub(/-[0-9]+$/, "", n)
		if (n != name) next
		for (i = 2; i <= NF; i++) if ($i == unit) print $(i-1)
	}' "$raw" | sort -g | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "0"; exit }
		if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2
	}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
check() { awk -v v="$1" -v min="$2" 'BEGIN { print (v >= min) ? "met" : "NOT met" }'; }

plain=$(median BenchmarkTransfer/plaintext MB/s)
tls=$(median BenchmarkTransfer/tls13 MB/s)
aes=$(median BenchmarkAESGCM MB/s)
cores=$(nproc)
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ceiling=$(awk -v p="$plain" -v a="$aes" -v c="$cores" 'BEGIN { printf "%.0f", 1 / (1/p + 2/(c*a)) }')

{
	echo "## Data plane"
	echo
	echo "Written by \`scripts/bench-report.sh\` on $(date -u +%Y-%m-%d): \`go test -bench\` of"
	echo "\`migagent/dataplane\`, median of $count runs of $benchtime each; every sub-benchmark moves the same"
	echo "64 MiB over loopback TCP, both ends in one process."
	echo
	echo "Machine: $cores cores, $cpu; $(go version | cut -d' ' -f3-); load average $load_before before, $load_after after."
	echo
	echo "| benchmark | MB/s | × plaintext | × tls13 | memory per stream |"
	echo "|---|---:|---:|---:|---:|"
	for b in plaintext tls13 lethe-1stream lethe-2streams lethe-4streams; do
		v=$(median "BenchmarkTransfer/$b" MB/s)
		m=$(median "BenchmarkTransfer/$b" B/stream)
		mem="—"
		if [ "$m" != "0" ]; then mem=$(awk -v m="$m" 'BEGIN { printf "%.1f MiB", m / 1048576 }'); fi
		echo "| $b | $v | $(ratio "$v" "$plain") | $(ratio "$v" "$tls") | $mem |"
	done
	echo
	echo "AES-256-GCM seal on one core: $aes MB/s. Ceiling with both ends on this machine,"
	echo "1 / (1/plaintext + 2/(cores × AES-GCM)): $ceiling MB/s ($(ratio "$ceiling" "$plain") × plaintext)."
	echo
	one=$(median BenchmarkTransfer/lethe-1stream MB/s)
	two=$(median BenchmarkTransfer/lethe-2streams MB/s)
	four=$(median BenchmarkTransfer/lethe-4streams MB/s)
	echo "- one stream ≥ 0.55 × plaintext: $(check "$(ratio "$one" "$plain")" 0.55) ($(ratio "$one" "$plain"))"
	echo "- one stream ≥ 1.3 × TLS 1.3: $(check "$(ratio "$one" "$tls")" 1.3) ($(ratio "$one" "$tls"))"
	echo "- more streams never slower than one: 2 streams $(check "$two" "$one"), 4 streams $(check "$four" "$one")"
	echo
	echo "Memory per stream counts the frame buffers of both ends (sender and receiver),"
	echo "for the source-to-destination direction and the little used reverse one."
	echo
	echo "### Downtime"
	echo
	echo "\`BenchmarkDowntime\`: one migration per run of a guest of each size over two streams, under"
	echo "the same workload (20,000 uniformly random page writes per second), median of"
	echo "${DOWNTIME_COUNT:-$count} runs. Downtime is from pausing the guest to the verified commit"
	echo "(\`SourceResult.Downtime\`); total is \`Source.Run\` (erasure of the source included); prepare"
	echo "is \`Destination.Prepare\` of a new receive region. chunk-digests is the data plane as it is"
	echo "(page and chunk digests kept as pages are sent and written); full-hash is the baseline, in"
	echo "the same run: all memory hashed in the pause on both sides. Both scrub the receive region"
	echo "(zeroes written, on huge pages where the kernel gives them)."
	echo
	echo "| guest | downtime ms | baseline downtime ms | total ms | baseline total ms | prepare ms | baseline prepare ms |"
	echo "|---|---:|---:|---:|---:|---:|---:|"
	for size in 256 1024 2048 4096; do
		row="| $size MiB |"
		for metric in downtime-ms total-ms prepare-ms; do
			for mode in chunk-digests full-hash; do
				row="$row $(median "BenchmarkDowntime/${size}MiB/$mode" "$metric" | awk '{ printf "%.0f", $1 }') |"
			done
		done
		echo "$row"
	done
	echo
	echo "A 16 MiB guest that rewrites all its memory every few milliseconds (2,000,000 sequential"
	echo "page writes per second), which pre-copy cannot converge unthrottled: with auto-converge (the"
	echo "source throttles the workload from 20% in steps of 10, as QEMU does) and, the baseline in"
	echo "the same run, without (paused after 30 rounds). final pages are those sent while paused."
	echo
	echo "| mode | downtime ms | final pages | rounds | total ms |"
	echo "|---|---:|---:|---:|---:|"
	for mode in auto-converge no-throttle; do
		row="| $mode |"
		for metric in downtime-ms final-pages rounds total-ms; do
			row="$row $(median "BenchmarkDowntime/16MiB-hot/$mode" "$metric" | awk '{ printf "%.0f", $1 }') |"
		done
		echo "$row"
	done
} > "$raw.section"

# Replace the Data plane section of $out, keeping the others.
if [ -f "$out" ]; then
	awk '/^## / { skip = ($0 == "## Data plane") } !skip' "$out" > "$raw.rest"
else
	printf '# Benchmarks\n\n' > "$raw.rest"
fi
{ cat "$raw.rest"; cat "$raw.section"; } > "$out"
echo "wrote $out"
