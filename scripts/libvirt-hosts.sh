#!/usr/bin/env bash
# libvirt-hosts.sh {install|up|down|status} — two independent libvirt "hosts" on one machine.
#
# Each host (lethe-a, lethe-b) is a libvirtd with its own network namespace (ip netns; the two
# are joined by one veth pair whose addresses exist only inside those namespaces) and its own
# mount namespace, in which /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
# /var/cache/libvirt are bind mounts of per-host directories under $LETHE_LIBVIRT_STATE. Each
# has a distinct host_uuid, runs QEMU as root without a security driver, cgroups or namespaces,
# and needs no systemd. Its unix socket is reachable from the root namespace at
#
#     $LETHE_LIBVIRT_STATE/<host>/libvirt-sock
#
# so `virsh -c 'qemu+unix:///system?socket=…'` and Go code can dial it. Guests use TCG.
#
#   install  apt-get the packages (run as root: libvirt, QEMU, and the guests' kernels, memtest86+
#            and Debian's Linux); create the libvirt-qemu user and group
#   up       start both hosts (idempotent; runs install first if libvirtd is missing)
#   down     kill everything the hosts run, delete the namespaces
#   status   print each host's state and socket
#
# Environment: LETHE_LIBVIRT_STATE (default /var/tmp/lethe-libvirt).
set -euo pipefail

STATE=${LETHE_LIBVIRT_STATE:-/var/tmp/lethe-libvirt}
HOSTS=(lethe-a lethe-b)
# Addresses live only inside the two namespaces; nothing in the root namespace routes to them.
declare -A ADDR=([lethe-a]=10.250.77.1 [lethe-b]=10.250.77.2)
declare -A VETH=([lethe-a]=lethe-a0 [lethe-b]=lethe-b0)
declare -A UUID=([lethe-a]=6c657468-6500-4a00-8000-0000000000a1 [lethe-b]=6c657468-6500-4b00-8000-0000000000b2)
PREFIX=30
BINDS=(/etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt)
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 memtest86+ linux-image-amd64 iproute2 util-linux)

log() { printf 'libvirt-hosts: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }

# subdir maps a bind-mount target to its per-host directory name.
subdir() { case $1 in
	/etc/libvirt) echo etc ;; /run/libvirt) echo run ;; /var/lib/libvirt) echo lib ;;
	/var/log/libvirt) echo log ;; /var/cache/libvirt) echo cache ;; esac; }

cmd_install() {
	need_root
	local missing=()
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		log "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		# The Linux guest boots with the tests' own initramfs: skip building Debian's, which
		# takes minutes.
		export INITRD=No
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
	getent passwd libvirt-qemu >/dev/null ||
		useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
			--shell /usr/sbin/nologin libvirt-qemu
	[ -r /boot/memtest86+x64.bin ] || die "memtest86+ installed but /boot/memtest86+x64.bin is missing"
	# The Linux guest boots Debian's kernel directly, with the tests' own initramfs.
	compgen -G '/boot/vmlinuz-*' >/dev/null || die "linux-image-amd64 installed but no /boot/vmlinuz-*"
}

write_config() {
	local h=$1 d=$STATE/$1
	mkdir -p "$d"/{etc,run,lib,log,cache,migrate} "$d/log/qemu" "$d/lib/qemu" "$d/cache/qemu"
	cp -n /etc/libvirt/libvirt.conf "$d/etc/" 2>/dev/null || true
	cat >"$d/etc/libvirtd.conf" <<EOF
# lethe test host $h
host_uuid = "${UUID[$h]}"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "${LETHE_LIBVIRT_LOG_LEVEL:-3}:file:/var/log/libvirt/libvirtd.log"
EOF
	cat >"$d/etc/qemu.conf" <<EOF
# lethe test host $h: QEMU as root, nothing that needs systemd, cgroups or an LSM.
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
migration_address = "${ADDR[$h]}"
migration_host = "${ADDR[$h]}"
EOF
}

running() { # running HOST → 0 if its libvirtd is alive
	local pidf=$STATE/$1/libvirtd.pid
	[ -s "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null
}

setup_net() {
	for h in "${HOSTS[@]}"; do
		ip netns list | grep -qw "^$h" || ip netns add "$h"
		ip -n "$h" link set lo up
	done
	if ! ip -n lethe-a link show "${VETH[lethe-a]}" >/dev/null 2>&1; then
		ip -n lethe-b link del "${VETH[lethe-b]}" 2>/dev/null || true
		ip link add "${VETH[lethe-a]}" netns lethe-a type veth peer name "${VETH[lethe-b]}" netns lethe-b
	fi
	for h in "${HOSTS[@]}"; do
		ip -n "$h" addr replace "${ADDR[$h]}/$PREFIX" dev "${VETH[$h]}"
		ip -n "$h" link set "${VETH[$h]}" up
	done
}

start_host() {
	local h=$1 d=$STATE/$1
	if running "$h"; then log "$h already running"; return; fi
	write_config "$h"
	rm -f "$d/run/libvirt-sock" "$d/run/libvirt-sock-ro" "$d/run/libvirt-admin-sock" "$d/libvirtd.pid"
	for t in "${BINDS[@]}"; do mkdir -p "$t"; done
	local mounts=""
	for t in "${BINDS[@]}"; do mounts+="mount --bind '$d/$(subdir "$t")' '$t' && "; done
	# ip netns exec gives the network namespace; unshare --mount a private mount namespace in
	# which the bind mounts below are invisible to everyone else.
	setsid ip netns exec "$h" unshare --mount --propagation private -- /bin/sh -c \
		"$mounts exec /usr/sbin/libvirtd --pid-file '$d/libvirtd.pid'" \
		</dev/null >"$d/libvirtd.out" 2>&1 &
	ln -sfn run/libvirt-sock "$d/libvirt-sock"
}

wait_host() {
	local h=$1 d=$STATE/$1 i
	for i in $(seq 1 300); do
		if [ -S "$d/run/libvirt-sock" ] &&
			virsh -q -c "qemu+unix:///system?socket=$d/libvirt-sock" uri >/dev/null 2>&1; then
			return 0
		fi
		running "$h" || [ "$i" -lt 20 ] || { cat "$d/libvirtd.out" >&2; die "$h: libvirtd exited"; }
		sleep 0.1
	done
	cat "$d/libvirtd.out" >&2
	die "$h: libvirtd socket did not come up within 30 s"
}

cmd_up() {
	need_root
	command -v libvirtd >/dev/null || [ -x /usr/sbin/libvirtd ] || cmd_install
	compgen -G '/boot/vmlinuz-*' >/dev/null || cmd_install
	getent passwd libvirt-qemu >/dev/null || cmd_install
	mkdir -p "$STATE"
	setup_net
	for h in "${HOSTS[@]}"; do start_host "$h"; done
	for h in "${HOSTS[@]}"; do wait_host "$h"; done
	# The first connection makes libvirtd probe QEMU (seconds, cached under cache/); do it now,
	# for both hosts at once, so tests start warm.
	local probes=()
	for h in "${HOSTS[@]}"; do
		virsh -q -c "qemu+unix:///system?socket=$STATE/$h/libvirt-sock" capabilities >/dev/null &
		probes+=($!)
	done
	for p in "${probes[@]}"; do wait "$p" || die "probing QEMU capabilities failed"; done
	cmd_status
}

alive() { # alive PID… → prints those still running (zombies count as gone)
	local p
	for p in "$@"; do
		[ -r "/proc/$p/stat" ] && ! awk '{exit ($3 == "Z") ? 0 : 1}' "/proc/$p/stat" 2>/dev/null && echo "$p"
	done
	return 0
}

cmd_down() {
	need_root
	local pids=""
	for h in "${HOSTS[@]}"; do
		# Everything in the host's network namespace is ours: libvirtd and its QEMUs.
		pids+=" $(ip netns pids "$h" 2>/dev/null || true)"
		[ -s "$STATE/$h/libvirtd.pid" ] && pids+=" $(cat "$STATE/$h/libvirtd.pid")"
	done
	# shellcheck disable=SC2086
	pids=$(alive $pids | sort -u)
	if [ -n "$pids" ]; then
		# shellcheck disable=SC2086
		kill $pids 2>/dev/null || true
		for _ in $(seq 1 100); do
			# shellcheck disable=SC2086
			[ -z "$(alive $pids)" ] && break
			sleep 0.1
		done
		# shellcheck disable=SC2086
		pids=$(alive $pids)
		# shellcheck disable=SC2086
		[ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
	fi
	for h in "${HOSTS[@]}"; do
		ip netns del "$h" 2>/dev/null || true
		rm -f "$STATE/$h/libvirtd.pid"
	done
	log "down"
}

cmd_status() {
	for h in "${HOSTS[@]}"; do
		local sock=$STATE/$h/libvirt-sock
		if running "$h"; then
			printf '%s\tup\t%s\t%s\tpid %s\n' "$h" "${ADDR[$h]}" "$sock" "$(cat "$STATE/$h/libvirtd.pid")"
		else
			printf '%s\tdown\n' "$h"
		fi
	done
}

case ${1:-} in
install) cmd_install ;;
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*) echo "usage: $0 {install|up|down|status}" >&2; exit 2 ;;
esac
