#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests against real PostgreSQL clusters
# and a real Kafka-protocol broker.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
# The Kafka log's tests start a Kafka-protocol broker (tansu); built once per machine (~13 min).
scripts/ensure-tansu.sh >/dev/null
cargo test --workspace --all-targets "$@"
