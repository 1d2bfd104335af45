#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests against real PostgreSQL clusters
# and a real Kafka-protocol broker. Every test binary runs even when one fails (no stopping at
# the first; two binaries run side by side); the end prints a summary: each binary's result
# and time, then every failing test's own output (which is what a CI log keeps). The full log
# is in target/test-logs/. SYNAPSE_TEST_JOBS=1 runs the binaries one at a time.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test kafka_group`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
scripts/ensure-cxx.sh
scripts/ensure-chromium.sh
logs="${CARGO_TARGET_DIR:-target}/test-logs"
mkdir -p "$logs"
# The Kafka log's tests start a Kafka-protocol broker (tansu), built once per machine. A first
# build runs beside the tests' build, which alone leaves a core idle at times (linking, build
# scripts); the tests wait for it.
tansu_build=""
if ! SYNAPSE_TANSU="$(scripts/ensure-tansu.sh --if-present)"; then
  echo "==> building tansu beside the tests (~10 minutes, once per machine); log: $logs/tansu-build.log"
  scripts/ensure-tansu.sh >"$logs/tansu-path" 2>"$logs/tansu-build.log" &
  tansu_build=$!
fi
wait_for_tansu() {
  [ -n "$tansu_build" ] || return 0
  echo "==> waiting for the tansu build to finish"
  while kill -0 "$tansu_build" 2>/dev/null; do
    echo "    tansu: $(grep -c '^ *Compiling' "$logs/tansu-build.log" || true) crates compiled so far"
    sleep 30
  done
  if ! wait "$tansu_build"; then
    tail -n 40 "$logs/tansu-build.log"
    echo "error: building tansu failed (log above; full: $logs/tansu-build.log)" >&2
    exit 1
  fi
  SYNAPSE_TANSU="$(cat "$logs/tansu-path")"
}
log="$logs/$(date +%Y%m%d-%H%M%S).log"
if [ $# -eq 0 ]; then
  # The whole suite: one build, then the binaries two at a time (scripts/run-tests.py).
  echo "==> building the tests (first build ~10 minutes on 2 cores; cargo shows its progress)"
  artifacts="$logs/artifacts.json"
  cargo test --workspace --all-targets --no-run --message-format=json-render-diagnostics >"$artifacts"
  wait_for_tansu
  export SYNAPSE_TANSU
  jobs="${SYNAPSE_TEST_JOBS:-2}"
  echo "==> running every test binary, $jobs at a time (~5 minutes); full log: $log"
  started=$(date +%s)
  set +e
  python3 scripts/run-tests.py "$artifacts" "$log" "$jobs"
  status=$?
  set -e
else
  # A selection (`--test mesh`, a name filter…): cargo's own runner, one binary at a time.
  echo "==> building the tests (cargo shows its progress)"
  cargo test --workspace --all-targets --no-run "$@"
  wait_for_tansu
  export SYNAPSE_TANSU
  echo "==> running the selected tests; full log: $log"
  started=$(date +%s)
  set +e
  cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" | grep --line-buffered -E '^\s+Running |^test result:|^test .* FAILED$|panicked at'
  status=${PIPESTATUS[0]}
  set -e
fi
exec python3 scripts/test-summary.py "$log" "$status" "$(($(date +%s) - started))"
