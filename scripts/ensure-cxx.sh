#!/usr/bin/env bash
# Installs g++ when no C++ compiler is present: usearch (the vector index's HNSW graph,
# docs/decisions/0019-vector-index.md) compiles its C++ with the crate.
set -euo pipefail
command -v c++ >/dev/null && exit 0
echo "==> installing g++ (usearch's C++; once per machine)" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
