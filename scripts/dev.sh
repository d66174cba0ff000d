#!/usr/bin/env bash
# dev.sh: a development stack of Lethe that stays up until it is stopped (make dev-up,
# dev-down, dev-clean): a Vault dev server with the keybroker's mounts, the broker with an
# embedded NATS server and JetStream, the keybroker, and three agents on emulated SEV-SNP
# platforms (host-a holds the guest demo/web), with the tenant demo registered and its
# policy applied. Every port is a free one picked at start.
#
#   scripts/dev.sh up      start the stack (if it is not running) and print its exports
#   scripts/dev.sh env     print the export lines of the running stack: eval "$(scripts/dev.sh env)"
#   scripts/dev.sh down    stop everything the stack started; logs stay
#   scripts/dev.sh clean   stop the stack and remove its directory
#
# The stack's directory is $LETHE_DEV_DIR, by default .dev/ in the repository (ignored by
# git): logs/, state/ (JetStream, the keybroker's journal), keys/, run/ (pids) and env. The
# Vault dev server keeps its keys in memory, so a stopped stack cannot be resumed: each `up`
# after a `down` starts from empty state.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
BIN=$root/bin
work=${LETHE_DEV_DIR:-$root/.dev}
GUEST_SIZE=${GUEST_SIZE:-64MiB}
# shellcheck source=scripts/stack.sh
. scripts/stack.sh

running() { # running: some process of the stack is still up
  local f
  for f in "$work"/run/*.pid; do
    [ -f "$f" ] && grep -qa -- "$BIN/" "/proc/$(cat "$f")/cmdline" 2>/dev/null && return 0
  done
  return 1
}

print_env() {
  [ -f "$work/env" ] || { echo "dev: no stack in $work: run 'make dev-up'" >&2; return 1; }
  cat "$work/env"
}

up() {
  if running; then
    echo "dev: the stack in $work is already up (make dev-down stops it); its exports:" >&2
    print_env
    return
  fi
  rm -rf "$work"/{logs,state,keys,run,emulator,env}
  stack_init
  STACK_DETACH=1
  trap 'rc=$?; if [ $rc -ne 0 ]; then echo "dev: failed (exit $rc); stopping what started. Logs: $work/logs" >&2; stack_stop; fi' EXIT

  stack_vault
  stack_broker
  stack_keybroker
  stack_agent host-a 0x73 --guest "demo/web=$GUEST_SIZE"
  stack_agent host-b 0x75
  stack_agent host-c 0x80
  stack_wait_hosts 3

  # The tenant demo: a key registered with the keybroker (signed by the operator's admin
  # key) and the CI policy, signed and applied, so that guests adopt and migrate at once.
  "$BIN/lethectl" keygen --out "$work/keys/tenant" >/dev/null
  "$BIN/lethectl" tenant register --tenant demo --pub "$work/keys/tenant/tenant.pub" \
    --admin-key "$work/keys/admin/admin.key" >/dev/null
  "$BIN/lethectl" policy sign --key "$work/keys/tenant/tenant.key" examples/policies/ci-emulated.yaml \
    --out "$work/keys/policy.signed" >/dev/null
  LETHE_TENANT=demo "$BIN/lethectl" policy apply "$work/keys/policy.signed" >/dev/null

  cat >"$work/env" <<EOF
export LETHE_NATS_URL=$LETHE_NATS_URL
export LETHE_ADMIN_KEY=$work/keys/admin/admin.key
export VAULT_ADDR=$VAULT_ADDR
export VAULT_TOKEN=$VAULT_TOKEN
export PATH=$BIN:\$PATH
EOF
  cat <<EOF

Lethe's development stack is up in $work:
  NATS (broker)   $LETHE_NATS_URL
  Vault           $VAULT_ADDR (transit/, lethe/)
  metrics         http://127.0.0.1:$broker_metrics/metrics (broker), http://127.0.0.1:$keybroker_metrics/metrics (keybroker)
  hosts           host-a (holds demo/web, $GUEST_SIZE), host-b, host-c
  tenant          demo: key $work/keys/tenant/tenant.key, policy applied
  logs            $work/logs/

Use it from this shell with:
  eval "\$(scripts/dev.sh env)"
which runs:
EOF
  sed 's/^/  /' "$work/env"
  cat <<EOF
then, for example:
  lethectl hosts list
  lethectl guests adopt web --host host-a --tenant demo
  lethectl migrate web --to host-b --wait --tenant demo
Stop it with 'make dev-down'; 'make dev-clean' also removes $work.
EOF
}

case "${1:-}" in
up) up ;;
env) print_env ;;
down)
  stack_stop
  echo "dev: the stack is stopped (logs: $work/logs; 'make dev-clean' removes them)"
  ;;
clean)
  stack_stop
  rm -rf "$work"
  echo "dev: removed $work"
  ;;
*)
  echo "usage: scripts/dev.sh up|env|down|clean" >&2
  exit 2
  ;;
esac
