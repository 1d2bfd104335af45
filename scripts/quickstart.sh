#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and show live replication
# between two local PostgreSQL nodes (pass --source URL --target URL for your own databases).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v cargo >/dev/null || missing+=("Rust ≥ 1.85 (https://rustup.rs)")
command -v cc >/dev/null || missing+=("a C compiler (apt-get install build-essential)")
command -v c++ >/dev/null || missing+=("a C++ compiler (apt-get install g++; builds the vector index's usearch)")
command -v make >/dev/null || missing+=("make (apt-get install build-essential)")
command -v perl >/dev/null || missing+=("perl (builds the vendored OpenSSL)")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'quickstart needs:\n' >&2; printf '  - %s\n' "${missing[@]}" >&2; exit 1
fi
echo "==> [1/3] PostgreSQL server binaries"
scripts/ensure-postgres.sh
if [ ! -x target/release/synapse ]; then
  echo "==> [2/3] building synapse (first build ~12 minutes on 2 cores, ~5 GB of disk; cargo shows its progress)"
else
  echo "==> [2/3] building synapse (up to date in seconds)"
fi
cargo build --release --bin synapse
echo "==> [3/3] starting the demo"
exec target/release/synapse quickstart "$@"
