#!/usr/bin/env bash
# Validates deploy/ where no container engine runs: the compose file against the Compose
# Specification's JSON Schema (shipped in the docker-compose 1.29.2 wheel), the Kubernetes
# manifests against Kubernetes 1.30's schemas (kubernetes-validate, strict: unknown fields fail).
# The tools come from PyPI into ~/.cache/synapse/deploy-tools once per machine.
# tests/deploy.rs runs this and also checks the embedded synapse configs and the systemd unit.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${XDG_CACHE_HOME:-$HOME/.cache}/synapse/deploy-tools"
if [ ! -x "$root/venv/bin/kubernetes-validate" ] || [ ! -f "$root/compose_spec.json" ]; then
  echo "installing deploy validators into $root (once)" >&2
  rm -rf "$root" && mkdir -p "$root"
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q kubernetes-validate==1.37.0 jsonschema pyyaml >&2
  "$root/venv/bin/pip" download -q --no-deps docker-compose==1.29.2 -d "$root/dl" >&2
  "$root/venv/bin/python" - "$root"/dl/docker_compose-1.29.2-*.whl "$root/compose_spec.json" <<'PY'
import sys, zipfile
open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))
PY
fi
# SYNAPSE_K8S_FILES / SYNAPSE_COMPOSE_FILES replace the files checked (the test feeds broken ones).
# shellcheck disable=SC2086
"$root/venv/bin/kubernetes-validate" --strict -k 1.30.0 ${SYNAPSE_K8S_FILES:-deploy/kubernetes/*.yaml}
# shellcheck disable=SC2086
"$root/venv/bin/python" - "$root/compose_spec.json" ${SYNAPSE_COMPOSE_FILES:-deploy/compose/compose.yaml} <<'PY'
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
for path in sys.argv[2:]:
    doc = yaml.safe_load(open(path))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    for e in errors:
        print(f"{path}: {'/'.join(map(str, e.path)) or '(top)'}: {e.message}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"{path}: valid against the Compose Specification")
PY
