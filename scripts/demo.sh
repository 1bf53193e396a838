#!/usr/bin/env bash
# The main job end to end: a broker, a worker, and one bot's intent model
# trained on CLINC150, with live progress, the confusion-matrix summary and
# the promotion decision.
#   scripts/demo.sh [JOB_FILE]     (default examples/jobs/clinc150-full.json)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
JOB_FILE=${1:-examples/jobs/clinc150-full.json}
DEMO_DIR=${DEMO_DIR:-.trainyard/demo}

ensure_cargo
ensure_python3
ensure_rabbitmq
echo "== building (first time: 30–40 min on 2 cores, burn is large; README.md)"
cargo build --quiet --bins
BIN=target/debug

export TRAINYARD_ARTIFACTS="$PWD/$DEMO_DIR/artifacts"
export TRAINYARD_DATA_DIR="$PWD/data"
export TRAINYARD_PREFIX=${TRAINYARD_PREFIX:-trainyard-demo}
mkdir -p "$DEMO_DIR"

export TRAINYARD_DATABASE_URL="sqlite://$PWD/$DEMO_DIR/trainyard.db"
export TRAINYARD_API_TOKENS=${TRAINYARD_API_TOKENS:-demo}
HTTP=${DEMO_HTTP:-127.0.0.1:8080}
echo "== starting the control plane on http://$HTTP (log: $DEMO_DIR/serve.log)"
"$BIN/trainyard" serve --listen "$HTTP" >"$DEMO_DIR/serve.log" 2>&1 &
SERVE=$!
echo "== starting a worker for intent-train, intent-eval and noop (log: $DEMO_DIR/worker.log)"
"$BIN/trainyard-worker" run --types intent-train,intent-eval,noop --metrics-addr 127.0.0.1:0 >"$DEMO_DIR/worker.log" 2>&1 &
WORKER=$!
trap 'kill -TERM $WORKER $SERVE 2>/dev/null; wait $WORKER $SERVE 2>/dev/null || true' EXIT
sleep 2

echo "== a no-op job first, to show the round trip"
"$BIN/trainyard" submit noop --bot demo --param sleep_ms=100 --wait --json

BOT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bot"])' "$JOB_FILE")
TYPE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["job_type"])' "$JOB_FILE")
PARAMS="$DEMO_DIR/params.json"
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1]))["params"], open(sys.argv[2], "w"))' "$JOB_FILE" "$PARAMS"

echo "== training: $TYPE for bot $BOT ($JOB_FILE)"
"$BIN/trainyard" submit "$TYPE" --bot "$BOT" --params-file "$PARAMS" --wait >"$DEMO_DIR/submit.out" || true
JOB_ID=$(awk 'NF==2 {print $1}' "$DEMO_DIR/submit.out" | tail -1)
STATUS=$(awk 'NF==2 {print $2}' "$DEMO_DIR/submit.out" | tail -1)
echo "job $JOB_ID: $STATUS"
[[ "$STATUS" == "succeeded" ]] || { echo "training did not succeed; worker log: $DEMO_DIR/worker.log" >&2; exit 1; }

python3 - "$TRAINYARD_ARTIFACTS" "$JOB_ID" <<'PY'
import json, os, sys
root, job_id = sys.argv[1], sys.argv[2]
d = os.path.join(root, "jobs", job_id)
out = json.load(open(os.path.join(root, "outcomes", job_id[-2:], job_id + ".json")))["event"]["result"]
m = json.load(open(os.path.join(d, "metrics.json")))
pct = lambda x: f"{100 * x:.1f}%"
print("== results")
print(f"accuracy {pct(m['accuracy'])}   macro-F1 {pct(m['macro_f1'])}", end="")
if "in_scope_accuracy" in m:
    print(f"   in-scope accuracy {pct(m['in_scope_accuracy'])}   OOS recall {pct(m['oos_recall'])}", end="")
print()
cm = json.load(open(os.path.join(d, "confusion_matrix.json")))
print(f"confusion matrix: {len(cm['labels'])} x {len(cm['labels'])} labels")
top = m.get("top_confusions") or out.get("top_confusions") or []
if top:
    print("top confusions (true -> predicted: count):")
    for t in top[:8]:
        print(f"  {t.get('label')} -> {t.get('predicted')}: {t.get('count')}")
promo = out.get("promotion") or {}
if promo:
    verdict = "PROMOTED to production" if promo.get("promoted") else ("passed the gate, not promoted (manual)" if promo.get("passed") else "REJECTED")
    print(f"promotion gate: {verdict}")
    for r in promo.get("reasons", []):
        print(f"  - {r}")
print(f"confusion matrix PNG: {os.path.join(d, 'confusion_matrix.png')}")
print(f"metrics:              {os.path.join(d, 'metrics.json')}")
PY
sleep 1
echo "== the job as the control plane recorded it (trainyard jobs show $JOB_ID)"
"$BIN/trainyard" jobs show "$JOB_ID" | head -25 || true
DEMO_TOKEN=${TRAINYARD_API_TOKENS%%,*}; DEMO_TOKEN=${DEMO_TOKEN##*:}
echo "console: http://$HTTP/#token=$DEMO_TOKEN   this job: http://$HTTP/jobs/$JOB_ID#token=$DEMO_TOKEN — press Enter to stop the demo"
if [[ -t 0 ]]; then read -r _; fi
