#!/usr/bin/env bash
# Prints the path of promtool (Prometheus' rule checker), extracted from Debian's `prometheus`
# package into ~/.cache/synapse/promtool once per machine: only the one binary is needed, not
# the server, its service or its web assets. A promtool on PATH is used as it is.
set -euo pipefail
if command -v promtool >/dev/null; then command -v promtool; exit 0; fi
root="${XDG_CACHE_HOME:-$HOME/.cache}/synapse/promtool"
if [ ! -x "$root/usr/bin/promtool" ]; then
  echo "promtool not found: extracting it from Debian's prometheus package into $root (once)" >&2
  dl="$(mktemp -d)"
  # apt's sandbox user may not write to a private temporary directory.
  chmod 755 "$dl"
  # A fresh machine may have no package lists yet.
  (cd "$dl" && { apt-get download prometheus >&2 || { apt-get update -qq >&2 && apt-get download prometheus >&2; }; })
  mkdir -p "$root"
  dpkg-deb -x "$dl"/prometheus_*.deb "$root"
  rm -rf "$dl"
fi
echo "$root/usr/bin/promtool"
