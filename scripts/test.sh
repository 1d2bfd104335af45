#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests against real PostgreSQL clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
cargo test --workspace --all-targets "$@"
