#!/usr/bin/env bash
# `make check-deploy`: validate every deployment artefact offline; exits non-zero if any check fails.
# One section per validator. To add checks, either add a section here or drop a script into
# deploy/scripts/check-deploy.d/NAME.sh: it is sourced with $ROOT, $PY, $BIN and `check CMD...`
# (runs CMD, prints it, records a failure) available, and must not `exit`.
# Override the inputs (the tests do, to prove a broken copy fails): COMPOSE_FILE, K8S_DIR, K8S_VERSION.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
COMPOSE_FILE="${COMPOSE_FILE:-deploy/compose/compose.yaml}"
K8S_DIR="${K8S_DIR:-deploy/k8s}"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
failures=0
section() { echo "== $*"; }
check() {
  echo "-- $*" >&2
  "$@" || { echo "FAILED: $*" >&2; failures=$((failures + 1)); }
}

section "compose: Compose specification schema (check-jsonschema's bundled vendor.compose-spec)"
check "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE_FILE"

section "kubernetes: kustomize renders base and overlays; kubernetes-validate --strict, schemas of Kubernetes $K8S_VERSION"
render_dir="$(mktemp -d)"
trap 'rm -rf "$render_dir"' EXIT
for kustomization in "$K8S_DIR"/base "$K8S_DIR"/overlays/*/; do
  name="$(basename "$kustomization")"
  if check "$PY" "$ROOT/deploy/k8s/render.py" "$kustomization" >"$render_dir/$name.yaml"; then
    check "$BIN/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$render_dir/$name.yaml"
  fi
done
section "kubernetes: job templates (not part of the kustomization)"
check "$BIN/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$K8S_DIR"/jobs/*.yaml

# --- more sections: deploy/prometheus (promtool), deploy/grafana (dashboard JSON) go below or in check-deploy.d ---
for extra in "$ROOT"/deploy/scripts/check-deploy.d/*.sh; do
  [ -e "$extra" ] || continue
  section "$(basename "$extra")"
  # shellcheck source=/dev/null
  source "$extra"
done

if [ "$failures" -ne 0 ]; then
  echo "check-deploy: $failures check(s) failed" >&2
  exit 1
fi
echo "check-deploy: all checks passed"
