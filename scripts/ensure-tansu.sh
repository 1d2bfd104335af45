#!/usr/bin/env bash
# Installs tansu, the Kafka-protocol broker the Kafka tests start (no Apache Kafka is needed or
# downloaded), into ~/.cache/synapse/tansu unless present. The first install builds it from
# crates.io (~11 minutes on 2 cores); later runs on the same machine reuse it.
# Prints the binary's path. SYNAPSE_TANSU names an existing binary instead. With --if-present
# it only looks: exit 1 (nothing printed) when it would have to build.
set -euo pipefail
if [ -n "${SYNAPSE_TANSU:-}" ] && [ -x "$SYNAPSE_TANSU" ]; then
  echo "$SYNAPSE_TANSU"; exit 0
fi
root="${XDG_CACHE_HOME:-$HOME/.cache}/synapse/tansu-0.6.0"
if [ ! -x "$root/bin/tansu" ]; then
  [ "${1:-}" = "--if-present" ] && exit 1
  echo "tansu not found: building it into $root (once; ~11 minutes)" >&2
  # The features and --locked are what builds (docs/decisions/0007-test-brokers.md: without them the build fails).
  cargo install tansu@0.6.0 --locked --features postgres,dynostore --root "$root" >&2
fi
echo "$root/bin/tansu"
