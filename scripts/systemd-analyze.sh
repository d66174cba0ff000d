#!/usr/bin/env bash
# systemd-analyze.sh installs systemd-analyze (Debian's systemd package), which the test of
# deploy/systemd's units runs (internal/release TestSystemdUnits). Needs root and apt-get;
# does nothing where systemd-analyze is already installed.
set -euo pipefail
if command -v systemd-analyze >/dev/null; then
	exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
	echo "systemd-analyze.sh: install systemd (systemd-analyze) as root with your package manager" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends systemd >/dev/null
command -v systemd-analyze >/dev/null
