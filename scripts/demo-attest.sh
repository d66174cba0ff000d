#!/usr/bin/env bash
# Lethe's demo, part one: attestation and policy, end to end, with emulated platforms.
# Everything it makes lives in a temporary directory that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
LETHECTL=${LETHECTL:-bin/lethectl}
[ -x "$LETHECTL" ] || go build -o bin/lethectl ./cmd/lethectl

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

rd=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')

for p in emulated-sev-snp emulated-tdx; do
  say "$p: emulate evidence bound to a fresh REPORT_DATA"
  run "$LETHECTL" attest emulate --platform "$p" --report-data "$rd" \
    --roots-out "$work/roots" --out "$work/$p.json"
  say "$p: verify it against the emulator's roots, binding checked"
  run "$LETHECTL" attest verify "$work/$p.json" --trust-roots "$work/roots" --report-data "$rd" | head -20
  echo "  ..."
  say "$p: a tampered copy (one byte of the signed report flipped) is rejected"
  python3 - "$work/$p.json" "$work/$p-tampered.json" <<'PY'
import base64, json, sys
ev = json.load(open(sys.argv[1]))
raw = bytearray(base64.b64decode(ev["raw"]))
raw[0x90] ^= 0x01          # inside the measured part of both an SNP report and a TDX quote
ev["raw"] = base64.b64encode(bytes(raw)).decode()
json.dump(ev, open(sys.argv[2], "w"))
PY
  if run "$LETHECTL" attest verify "$work/$p-tampered.json" --trust-roots "$work/roots" --report-data "$rd" >/dev/null; then
    echo "demo: the tampered evidence verified; that is a bug" >&2; exit 1
  fi
  say "$p: evidence bound to another REPORT_DATA is rejected"
  if run "$LETHECTL" attest verify "$work/$p.json" --trust-roots "$work/roots" --report-data 00 >/dev/null; then
    echo "demo: evidence verified against the wrong binding; that is a bug" >&2; exit 1
  fi
done

say "A tenant signs a policy and tests it against two emulated destinations"
run "$LETHECTL" keygen --out "$work/tenant"
run "$LETHECTL" policy sign --key "$work/tenant/tenant.key" examples/policies/ci-emulated.yaml --out "$work/policy.signed"
run "$LETHECTL" attest emulate --platform emulated-sev-snp --report-data 00 --tcb bl=3,tee=0,snp=20,ucode=0x14 \
  --roots-out "$work/roots" --out "$work/src.json" >/dev/null
# A destination states that its receive region was zeroed and read back as zero.
echo '{"type":"lethe.dev/clean-memory/v1","zeroed":true,"verifiedZero":true,"bytes":268435456}' >"$work/clean.json"
run "$LETHECTL" attest emulate --platform emulated-sev-snp --report-data 00 --tcb bl=3,tee=0,snp=20,ucode=0x16 \
  --statement "$work/clean.json" --roots-out "$work/roots" --out "$work/good.json" >/dev/null
run "$LETHECTL" attest emulate --platform emulated-sev-snp --report-data 00 --tcb bl=3,tee=0,snp=20,ucode=0x12 \
  --statement "$work/clean.json" --roots-out "$work/roots" --out "$work/weak.json" >/dev/null
say "to a destination with newer microcode: allowed"
run "$LETHECTL" policy test "$work/policy.signed" --pub "$work/tenant/tenant.pub" --trust-roots "$work/roots" \
  --source "$work/src.json" --destination "$work/good.json" || true
say "to a destination with older microcode: denied, with the reason"
if run "$LETHECTL" policy test "$work/policy.signed" --pub "$work/tenant/tenant.pub" --trust-roots "$work/roots" \
  --source "$work/src.json" --destination "$work/weak.json"; then
  echo "demo: the weak destination was allowed; that is a bug" >&2; exit 1
fi
say "done: attestation and policy work end to end"
