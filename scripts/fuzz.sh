#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer on the stable toolchain (no cargo-fuzz, no nightly):
# builds fuzz/ with the sanitizer-coverage passes and runs each target for FUZZ_SECONDS
# (default 20). A crash stops the script with the input that caused it, under
# fuzz/artifacts/<target>/; replay it with `fuzz/target/…/<target> <file>`.
# Targets: pgoutput (the decoder), transport (frames of the replication connection),
# log_record (the log's record decoding), cursor (cursors, Last-Event-ID, LSNs). The text
# parsers of the API and the configuration are fuzzed by proptest in the test suite
# (connectors/src/filter.rs, runtime/src/config/mod.rs).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
target="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-target}"
# What `cargo fuzz build --sanitizer none` passes; --target keeps it off build scripts.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
echo "==> building the fuzz targets (release, ~4 minutes the first time)"
cargo build --release --bins --target "$target"
for t in pgoutput transport log_record cursor; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "==> fuzzing $t for ${seconds}s"
  "$CARGO_TARGET_DIR/$target/release/$t" -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" "corpus/$t" 2>&1 \
    | grep -E --line-buffered '^(#[0-9]+\s+DONE|Done |stat::number_of_executed_units|==[0-9]+==|SUMMARY|.*panicked|artifact_prefix|Test unit written)' || true
  if compgen -G "artifacts/$t/*" >/dev/null; then
    echo "FUZZ FAILURE in $t: $(ls artifacts/$t/)" >&2
    exit 1
  fi
done
echo "==> no target crashed"
