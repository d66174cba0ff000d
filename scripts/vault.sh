#!/usr/bin/env bash
# vault.sh makes bin/vault: a real Vault server for tests and the demo.
#
# Where a `vault` of v1.15 or later is on the PATH, bin/vault links to it. Otherwise Vault
# v1.21.0 is built once, from the Go module proxy through the `tool` directive of tools/go.mod,
# into a per-user cache outside the repository (so every clone on this machine reuses it):
#   ${XDG_CACHE_HOME:-$HOME/.cache}/lethe/vault-v1.21.0
# The build writes to a temporary file and renames it into place, so an interrupted build
# never leaves a broken binary behind. When bin/vault already works, nothing is done.
set -euo pipefail

VERSION=v1.21.0
MIN_MAJOR=1
MIN_MINOR=15

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/lethe"
cached="$cache/vault-$VERSION"
link="$root/bin/vault"

say() { echo "vault.sh: $*"; }

# version_ok BINARY succeeds when BINARY reports Vault v1.15 or later.
version_ok() {
	local v
	v="$("$1" version 2>/dev/null | sed -n 's/^Vault v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)"
	[ -n "$v" ] || return 1
	set -- $v
	[ "$1" -gt "$MIN_MAJOR" ] || { [ "$1" -eq "$MIN_MAJOR" ] && [ "$2" -ge "$MIN_MINOR" ]; }
}

if [ -x "$link" ] && version_ok "$link"; then
	say "bin/vault is there ($("$link" version | head -n1)); nothing to do"
	exit 0
fi

mkdir -p "$root/bin"

if onpath="$(command -v vault 2>/dev/null)" && [ "$(readlink -f "$onpath")" != "$(readlink -f "$link" 2>/dev/null || true)" ] && version_ok "$onpath"; then
	ln -sfn "$onpath" "$link"
	say "linked bin/vault -> $onpath ($("$onpath" version | head -n1))"
	exit 0
fi

if [ -x "$cached" ] && version_ok "$cached"; then
	say "using the cached build $cached"
else
	mkdir -p "$cache"
	tmp="$(mktemp "$cache/vault-$VERSION.XXXXXX.tmp")"
	trap 'rm -f "$tmp"' EXIT
	say "building Vault $VERSION into $cached (once per machine; 10-20 minutes on 2 cores from cold)"
	(cd "$root/tools" && go build -o "$tmp" github.com/hashicorp/vault)
	version_ok "$tmp" || { say "the built binary does not report Vault $VERSION"; exit 1; }
	mv -f "$tmp" "$cached"
	trap - EXIT
	say "built $cached"
fi

ln -sfn "$cached" "$link"
say "linked bin/vault -> $cached"
