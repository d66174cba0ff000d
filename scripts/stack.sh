# stack.sh: Lethe's development stack on one machine — a Vault dev server, the broker with
# its embedded NATS server, the keybroker and agents on emulated SEV-SNP platforms — as
# functions that scripts/demo.sh and scripts/dev.sh source (it is not run by itself).
#
# The caller sets root (the repository), BIN (its bin/) and work (the stack's directory);
# stack_init makes work's logs/, state/, keys/ and run/ and picks free ports. Each process is
# started by `start NAME …`, logs to $work/logs/NAME.log, and its pid is kept in the array
# pids and in $work/run/NAME.pid, so that a later `stack_stop` (scripts/dev.sh down) stops
# exactly what was started. With STACK_DETACH=1 the processes get their own session, so that
# they outlive the script and its terminal.

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitfor() { # waitfor WHAT SECONDS COMMAND...
  local what=$1 n=$(( $2 * 10 )); shift 2
  until "$@" >/dev/null 2>&1; do
    n=$((n-1)); [ $n -gt 0 ] || { echo "$what did not come up; see $work/logs" >&2; return 1; }
    sleep 0.1
  done
}
http_ok() { python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"; }
pids=()
start() { # start NAME COMMAND...
  local name=$1; shift
  if [ "${STACK_DETACH:-}" = 1 ]; then
    setsid "$@" >"$work/logs/$name.log" 2>&1 </dev/null &
  else
    "$@" >"$work/logs/$name.log" 2>&1 &
  fi
  pids+=($!)
  echo $! >"$work/run/$name.pid"
}
vault() { "$BIN/vault" "$@"; }

# stack_init makes the work directory and picks this stack's ports; it exports what lethectl
# and the vault CLI read (LETHE_NATS_URL, VAULT_ADDR, VAULT_TOKEN).
stack_init() {
  for c in lethectl lethe-broker lethe-keybroker lethe-agent vault; do
    [ -x "$BIN/$c" ] || { echo "$BIN/$c is missing: run 'make build vault'" >&2; return 1; }
  done
  mkdir -p "$work"/{logs,state,keys,run}
  nats_port=$(freeport); vault_port=$(freeport); broker_metrics=$(freeport); keybroker_metrics=$(freeport)
  export LETHE_NATS_URL=nats://127.0.0.1:$nats_port
  export VAULT_ADDR=http://127.0.0.1:$vault_port
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/keys/vault.token")
  VAULT_TOKEN=$(cat "$work/keys/vault.token"); export VAULT_TOKEN
}

# vault_mounts_ready succeeds once Vault has the keybroker's mounts and KV v2 accepts writes
# (a fresh KV v2 mount upgrades itself for a moment after it is enabled).
vault_mounts_ready() {
  vault secrets list -format=json | grep -q '"transit/"' &&
    vault kv put lethe/stack/ready ok=true >/dev/null &&
    vault kv metadata delete lethe/stack/ready >/dev/null
}

# stack_vault starts a Vault dev server (in memory) and waits until it answers, then enables
# Transit at transit/ and KV v2 at lethe/ and waits until both are usable: the keybroker is
# started only after that.
stack_vault() {
  start vault "$BIN/vault" server -dev -dev-listen-address="127.0.0.1:$vault_port" -dev-root-token-id="$VAULT_TOKEN"
  waitfor "Vault" 30 vault status
  vault secrets enable transit >/dev/null
  vault secrets enable -path=lethe kv-v2 >/dev/null
  waitfor "Vault's transit/ and lethe/ mounts" 30 vault_mounts_ready
}

# stack_broker starts the broker from deploy/dev/, with its embedded NATS server on this
# stack's port, and waits until it answers lethectl.
stack_broker() {
  start broker "$BIN/lethe-broker" --config deploy/dev/lethe-broker.yaml \
    --dev-listen "127.0.0.1:$nats_port" --dev-store "$work/state/jetstream" --metrics-listen "127.0.0.1:$broker_metrics"
  waitfor "the broker" 30 "$BIN/lethectl" hosts list
}

# stack_keybroker makes the emulated platform's roots and the operator's admin key, starts
# the keybroker and waits until its /readyz passes (NATS, Vault and its mounts, its service),
# then exports its receipt-signing key to $work/keys/keybroker.pub for the agents.
stack_keybroker() {
  # One software "AMD" root for every emulated host, as real SNP hosts share AMD's roots;
  # each agent signs as its own chip with its own TCB.
  "$BIN/lethectl" attest emulate --platform emulated-sev-snp --report-data 00 \
    --roots-out "$work/emulator" --out "$work/state/probe.json" >/dev/null
  # The operator's admin key: the keybroker pins its public half and accepts only admin
  # requests signed by it (short-lived, each used once); no admin secret ever crosses NATS.
  "$BIN/lethectl" keygen --name admin --out "$work/keys/admin" >/dev/null
  start keybroker "$BIN/lethe-keybroker" --config deploy/dev/lethe-keybroker.yaml --metrics-listen "127.0.0.1:$keybroker_metrics" \
    --nats-url "$LETHE_NATS_URL" --trust-roots "$work/emulator" \
    --vault-addr "$VAULT_ADDR" --vault-token-file "$work/keys/vault.token" \
    --admin-pub "$work/keys/admin/admin.pub" --state-dir "$work/state/keybroker"
  waitfor "the keybroker" 30 http_ok "http://127.0.0.1:$keybroker_metrics/readyz"
  "$BIN/lethe-keybroker" --vault-addr "$VAULT_ADDR" --vault-token-file "$work/keys/vault.token" \
    --state-dir "$work/state/keybroker-pub" --export-pub "$work/keys/keybroker.pub" >/dev/null 2>&1
}

# stack_agent HOST UCODE [FLAGS...] starts an agent on an emulated SEV-SNP platform whose
# microcode SVN is UCODE.
stack_agent() {
  local host=$1 ucode=$2; shift 2
  start "$host" "$BIN/lethe-agent" --config deploy/dev/lethe-agent.yaml --nats-url "$LETHE_NATS_URL" \
    --keybroker-pub "$work/keys/keybroker.pub" --host "$host" --emulator-dir "$work/emulator" \
    --emulated-tcb "bl=3,tee=0,snp=20,ucode=$ucode" "$@"
}

# stack_wait_hosts N waits until N hosts are live.
hosts_live() { [ "$("$BIN/lethectl" hosts list -o json | grep -c '"live": *true')" -ge "$1" ]; }
stack_wait_hosts() { waitfor "the agents" 30 hosts_live "$1"; }

# stack_stop stops the processes whose pids are in $work/run, each only if it is still the
# command this stack started, in three waves that each wait for their processes to end: the
# agents, then the keybroker and the broker (which serves NATS), then Vault.
stack_stop() {
  local agents
  agents=$(ls "$work/run" 2>/dev/null | sed -n 's/\.pid$//p' | grep -v '^\(broker\|keybroker\|vault\)$' || true)
  # shellcheck disable=SC2086
  stop_wave $agents
  stop_wave keybroker broker
  stop_wave vault
}

# stop_wave NAME... sends SIGTERM to each named process of the stack, waits up to 15s for all
# of them to end, and kills those left.
stop_wave() {
  local name f pid live=()
  for name in "$@"; do
    f=$work/run/$name.pid
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    rm -f "$f"
    grep -qa -- "$BIN/" "/proc/$pid/cmdline" 2>/dev/null || continue
    kill "$pid" 2>/dev/null && live+=("$name:$pid")
  done
  for _ in $(seq 150); do
    local still=()
    for np in "${live[@]}"; do kill -0 "${np#*:}" 2>/dev/null && still+=("$np"); done
    live=("${still[@]}")
    [ ${#live[@]} -eq 0 ] && return
    sleep 0.1
  done
  for np in "${live[@]}"; do
    echo "${np%%:*} (pid ${np#*:}) did not stop within 15s: killing it" >&2
    kill -KILL "${np#*:}" 2>/dev/null || true
  done
}
