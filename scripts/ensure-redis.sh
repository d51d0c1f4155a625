#!/usr/bin/env bash
# Make sure the redis-server and redis-sentinel binaries exist (tests, `make demo` and `gkt chaos` start
# private ones on free ports). Debian's packages would start a system Redis on port 6379 and a system
# Sentinel on 26379: a temporary policy-rc.d forbids that while they install.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v redis-sentinel >/dev/null 2>&1; then exit 0; fi
echo "redis-server or redis-sentinel not found: installing Debian's redis-server and redis-sentinel packages" >&2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-sentinel >/dev/null
command -v redis-server >/dev/null && command -v redis-sentinel >/dev/null
