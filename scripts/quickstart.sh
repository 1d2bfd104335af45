#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and show live replication
# between two local PostgreSQL nodes (pass --source URL --target URL for your own databases).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
cargo build --release --quiet --bin synapse
exec target/release/synapse quickstart "$@"
