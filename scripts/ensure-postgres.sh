#!/usr/bin/env bash
# Installs the PostgreSQL server binaries (Debian/Ubuntu) when none are present. Tests and the
# quickstart start their own clusters from them; no server needs to be running.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || [ -n "${SYNAPSE_PG_BINDIR:-}" ]; then
  exit 0
fi
echo "PostgreSQL server binaries not found: installing them" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
# Debian starts a default cluster; SynapseDB does not need it.
$SUDO systemctl disable --now postgresql >/dev/null 2>&1 || $SUDO service postgresql stop >/dev/null 2>&1 || true
