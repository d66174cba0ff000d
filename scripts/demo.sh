#!/usr/bin/env bash
# Lethe's demo: a whole confidential-VM migration on one machine, with emulated SEV-SNP hosts.
#
# It starts a Vault dev server, the broker (with an embedded NATS server and JetStream), the
# keybroker and four agents — host-a and host-b with good firmware, host-c with older
# microcode than the policy allows, host-d with the newest — as separate processes, then, as
# a tenant:
#   1. registers its policy key, signs and applies ci-emulated.yaml, adopts a 256 MiB guest
#      on host-a whose workload keeps dirtying pages,
#   2. migrates it to host-b with a live progress bar, shows the memory digest the destination
#      checked, shows the source's Vault keys gone, and verifies the erasure receipt offline,
#   3. tries to move it on to the weak host-c and shows the denial with its reason,
# then, as the operator, drains host-b (the broker places the guest on host-d, the only host
# whose firmware is at least host-b's), and, as the tenant again, verifies the guest's whole
# residency history. It stops everything it started. Logs stay in the work directory it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
BIN=$root/bin
GUEST_SIZE=${GUEST_SIZE:-256MiB}

work=${DEMO_DIR:-$(mktemp -d /tmp/lethe-demo.XXXXXX)}
# shellcheck source=scripts/stack.sh
. scripts/stack.sh
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ $rc -eq 0 ]; then
    printf '\nEverything the demo started is stopped. Logs: %s/logs\n' "$work"
  else
    printf '\ndemo: failed (exit %d). Everything it started is stopped. Logs: %s/logs\n' "$rc" "$work" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

stack_init

bold "Starting Vault (dev server, in memory), NATS with JetStream, the keybroker and the broker"
stack_vault
echo "Vault $("$BIN/vault" version | awk '{print $2}') on $VAULT_ADDR, Transit and KV enabled"
# Each daemon runs from its development example in deploy/dev/, with this run's ports and paths.
stack_broker
stack_keybroker
echo "keybroker receipt-signing key: $work/keys/keybroker.pub"

bold "Starting four agents with emulated SEV-SNP platforms"
stack_agent host-a 0x73 --guest "demo/web=$GUEST_SIZE"
stack_agent host-b 0x75
stack_agent host-c 0x64
stack_agent host-d 0x80
stack_wait_hosts 4
run "$BIN/lethectl" hosts list
echo "(host-c's microcode 0x64 is older than host-a's 0x73; host-d's 0x80 is the newest)"

export LETHE_TENANT=demo
bold "As the tenant: a key, registered with the keybroker; the policy, signed and applied"
run "$BIN/lethectl" keygen --out "$work/keys/tenant"
LETHE_TENANT= run "$BIN/lethectl" tenant register --tenant demo --pub "$work/keys/tenant/tenant.pub" \
  --admin-key "$work/keys/admin/admin.key"
run "$BIN/lethectl" policy sign --key "$work/keys/tenant/tenant.key" examples/policies/ci-emulated.yaml \
  --out "$work/policy.signed"
run "$BIN/lethectl" policy apply "$work/policy.signed"
echo
echo "The tenant fetches the keybroker's key, which signs its receipts and the residency log"
echo "(and compares its key ID with the one its provider publishes elsewhere):"
run "$BIN/lethectl" keybroker pubkey --out "$work/keys/tenant-keybroker.pub"
cmp -s "$work/keys/tenant-keybroker.pub" "$work/keys/keybroker.pub" || {
  echo "demo: the key fetched over NATS is not the one the keybroker exported" >&2; exit 1; }
echo "(the same key the keybroker exported at start)"

bold "Adopting the guest on host-a (its first memory key, epoch 1, sealed to host-a's agent)"
run "$BIN/lethectl" guests adopt web --host host-a
run "$BIN/lethectl" guests list
echo
echo "Vault Transit keys now:"; vault list -format=table transit/keys | sed 's/^/  /'
echo
echo "The tenant pins the keybroker's residency log as it is now: every later key decision"
echo "about its guest must extend this checkpoint."
run "$BIN/lethectl" log checkpoint --pub "$work/keys/tenant-keybroker.pub" --out "$work/pinned.checkpoint"

bold "1. Migrating the guest to host-b while its workload keeps dirtying pages"
run "$BIN/lethectl" migrate web --to host-b --wait | tee "$work/migrate.out"
mig=$(grep -o 'mig-[A-Za-z0-9_-]*' "$work/migrate.out" | head -1)
[ -n "$mig" ] || { echo "demo: no migration id in the output" >&2; exit 1; }
run "$BIN/lethectl" migrations get "$mig"
digest=$("$BIN/lethectl" migrations get "$mig" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["progress"]["memoryDigest"])')
echo
echo "Guest memory SHA-256, taken by host-a while paused at cutover and recomputed by host-b"
echo "over what it received (host-b refuses to commit unless they match): $digest"
echo
echo "Vault Transit keys now (the epoch-1 key and the migration key are destroyed):"
vault list -format=table transit/keys | sed 's/^/  /'
if vault read "transit/keys/lethe-demo-web-e1" >/dev/null 2>&1; then
  echo "demo: the source's epoch key still exists; that is a bug" >&2; exit 1
fi
run "$BIN/lethectl" receipt get "$mig" --out "$work/receipt.json"
run "$BIN/lethectl" receipt verify "$work/receipt.json" --pub "$work/keys/tenant-keybroker.pub" \
  --migration "$mig" --tenant demo --vm web --require-erased --require-logged

bold "2. Trying to move the guest on to host-c, whose firmware is older than the source's"
if run "$BIN/lethectl" migrate web --to host-c --wait; then
  echo "demo: the weak host was accepted; that is a bug" >&2; exit 1
fi
run "$BIN/lethectl" guests list

bold "3. The operator drains host-b for maintenance: placement prefers a host whose firmware is at least the source's"
LETHE_TENANT= run "$BIN/lethectl" hosts drain host-b --reason "firmware update" --wait
LETHE_TENANT= run "$BIN/lethectl" hosts list
run "$BIN/lethectl" guests list

bold "4. The guest's whole residency history, verified against the checkpoint pinned at adoption"
run "$BIN/lethectl" guests history web --verify --pub "$work/keys/tenant-keybroker.pub" \
  --pinned "$work/pinned.checkpoint" --update-pinned

bold "What the broker and keybroker counted (Prometheus, /metrics)"
curl_metrics() { python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"; }
curl_metrics "http://127.0.0.1:$broker_metrics/metrics" | grep -E '^lethe_broker_migrations_finished_total' || true
curl_metrics "http://127.0.0.1:$keybroker_metrics/metrics" | grep -E '^lethe_keybroker_decisions_total' || true

bold "Done"
cat <<EOF
The guest moved host-a → host-b encrypted end to end, host-a's keys are gone from Vault, the
receipt verified offline, the weak host was refused, the drain of host-b moved it on to the
newest host with a receipt of its own, and the guest's residency history verified complete
against the checkpoint pinned at adoption. Where to look next:
  logs            $work/logs/{broker,keybroker,host-a,host-b,host-c,host-d,vault}.log
  receipt         $work/receipt.json (lethectl receipt show)
  configuration   deploy/dev/ (what the demo ran), deploy/ (production), docs/configuration.md
  metrics         while the demo runs: http://127.0.0.1:$broker_metrics/metrics (broker),
                  http://127.0.0.1:$keybroker_metrics/metrics (keybroker); /healthz and /readyz beside them
  protocol        docs/DESIGN.md, docs/protocol.md, docs/receipt.md, docs/log.md
EOF
