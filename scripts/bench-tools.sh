#!/usr/bin/env bash
# Installs the baselines `synapse-bench` compares against that PostgreSQL does not ship:
# pg_comparator (Debian package postgresql-comparator, with its pgcmp extension) and reladiff
# (PyPI, in a virtualenv under ~/.cache/synapse/bench-tools). Idempotent.
set -euo pipefail
if ! command -v pg_comparator >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq postgresql-comparator python3-venv >/dev/null
fi
venv="${HOME}/.cache/synapse/bench-tools"
if [ ! -x "$venv/bin/reladiff" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'reladiff[postgresql]==0.6.0'
fi
echo "pg_comparator: $(command -v pg_comparator); reladiff: $venv/bin/reladiff ($("$venv/bin/reladiff" --version))"
