#!/usr/bin/env bash
# Benchmarks trainyard against its baselines, each measured in the same run:
#   dispatch  N noop jobs through the whole pipeline vs raw lapin doing the same broker operations
#   outcomes  the worker's durable outcome-record write alone (µs per record)
#   celery    the same no-op jobs through Celery with equivalent safety, bare and with task
#             events, a Redis result backend and an event monitor (`celery_events`)
#   pickup    submit -> `started` latency on an idle worker (and raw)
#   footprint idle RSS of trainyard-worker (all job types) vs an idle Celery solo worker
#   training  CLINC150 full: trainyard-worker train vs scikit-learn TF-IDF + LinearSVC
#   scaling   1, 2, 4 worker processes x 1..64 slots, trainyard and raw
#   store     a job store of 1,000,000 jobs (~5 events each, 10,000 bots) on SQLite and PostgreSQL:
#             `jobs list` p95 by filter, demand query p95, a filtered page over HTTP, recorder events/s
#   --gpu     the CUDA backend's epoch time vs CPU (only where nvidia-smi finds a GPU)
# Writes target/bench/results.json and prints a Markdown table.
#
# Usage: scripts/bench.sh [--quick] [--gpu] [--only store|fairness]
#   --quick  fewer jobs (about 7 minutes after the release build; the store: 100,000 jobs)
#   --only store  the store scenario alone (the other scenarios' raw outputs of an earlier run are kept)
#   --only fairness  the fairness scenario alone (fair share, tiers, coalescing; ~3 min)
# Environment: TRAINYARD_AMQP_URL (default: local broker), BENCH_JOBS, BENCH_CELERY_JOBS,
#   BENCH_WORKERS, BENCH_SLOTS, BENCH_SUBMITTERS, BENCH_STORE_JOBS to override the sizes;
#   TRAINYARD_BENCH_DATABASE_URL the PostgreSQL of the store scenario (default: the local `test` database).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

QUICK=0
GPU=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) QUICK=1 ;;
    --gpu) GPU=1 ;;
    --only) ONLY=${2:-}; shift ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --quick, --gpu, --only store|fairness)" >&2; exit 2 ;;
  esac
  shift
done
[[ -z $ONLY || $ONLY == store || $ONLY == fairness ]] || { echo "--only: unknown scenario ${ONLY:-(none)} (known: store, fairness)" >&2; exit 2; }

if [[ $QUICK == 1 ]]; then
  JOBS=${BENCH_JOBS:-5000}; CELERY_JOBS=${BENCH_CELERY_JOBS:-3000}; PICKUP_JOBS=300
  SCALING_JOBS=1000; SCALING_WORKERS=1,2; SCALING_SLOTS=1,16,64; REPEAT=2
else
  JOBS=${BENCH_JOBS:-20000}; CELERY_JOBS=${BENCH_CELERY_JOBS:-20000}; PICKUP_JOBS=1000
  SCALING_JOBS=3000; SCALING_WORKERS=1,2,4; SCALING_SLOTS=1,4,16,64; REPEAT=2
fi
WORKERS=${BENCH_WORKERS:-1}
SLOTS=${BENCH_SLOTS:-64}
SUBMITTERS=${BENCH_SUBMITTERS:-8}
STORE_JOBS=${BENCH_STORE_JOBS:-$([[ $QUICK == 1 ]] && echo 100000 || echo 1000000)}

OUT=target/bench
RAW=$OUT/raw
RUN=$OUT/run
mkdir -p "$RAW" "$RUN"
# --only re-runs one scenario and reports it with the other scenarios' outputs of an earlier run.
if [[ -z $ONLY ]]; then rm -f "$RAW"/*.json; else rm -f "$RAW/$ONLY.json"; fi
PREFIX="bench-$(date +%s)-$$"
BENCH=target/release/trainyard-bench
VENV=$OUT/venv
export TRAINYARD_AMQP_URL=${TRAINYARD_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export TRAINYARD_LOG_FORMAT=json

ensure_cargo
ensure_rabbitmq
# The store scenario's PostgreSQL: TRAINYARD_BENCH_DATABASE_URL, else the tests' database
# (TRAINYARD_TEST_DATABASE_URL, else the local one, started here). Redis for Celery's results.
if [[ $ONLY != fairness && -z "${TRAINYARD_BENCH_DATABASE_URL:-}" ]]; then
  if [[ -n "${TRAINYARD_TEST_DATABASE_URL:-}" ]]; then
    export TRAINYARD_BENCH_DATABASE_URL=$TRAINYARD_TEST_DATABASE_URL
  else
    ensure_postgres || exit 1
  fi
fi
[[ $ONLY == store || $ONLY == fairness ]] || ensure_redis || exit 1

PREFIXES=()
SHM=/dev/shm/trainyard-bench-$PREFIX
cleanup() {
  # Every run deletes its own queues; this catches a run that failed half-way.
  [[ -x $BENCH && ${#PREFIXES[@]} -gt 0 ]] && "$BENCH" cleanup "${PREFIXES[@]}" >/dev/null 2>&1 || true
  rm -rf "$RUN/$PREFIX"* "$SHM" 2>/dev/null || true
}
trap cleanup EXIT

if [[ $ONLY == store ]]; then
  # The store scenario runs `trainyard serve` in-process: the bench binary is all it needs.
  phase "release build (trainyard-bench)" cargo build --release -p trainyard-bench
else
  phase "release build" cargo build --release --bins
fi

if [[ -z $ONLY ]] && [[ ! -x $VENV/bin/celery ]] || ! "$VENV/bin/python" -c 'import sklearn, celery, redis' 2>/dev/null; then
  phase "python venv (celery, redis, scikit-learn)" bash -c "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q 'celery>=5.5,<6' 'redis>=5,<7' 'scikit-learn>=1.4,<2'"
fi

# Celery >= 5.5 declares global delayed-delivery queues for quorum queues; remove them afterwards unless they were there.
CELERY_KEEP=""
[[ -z $ONLY ]] && [[ $(BENCH_CELERY_QUEUE="$PREFIX-celery" "$VENV/bin/python" bench/python/celery_bench.py --check-delayed) == 1 ]] && CELERY_KEEP=--delayed-existed

# A failed scenario is reported and the others still run; the exit status says so at the end.
FAILED=()
# Waits (up to 30 s) until a local broker is idle, so that a scenario does not pay for the
# previous one's queue deletions (a deleted stream or quorum queue is torn down in the background).
# First it writes back what is dirty on the disks (`sync`): the build's outputs and the scenario
# before's files would otherwise be flushed by the first `syncfs` of trainyard's outcome records,
# which writes back everything dirty on its file system, while the raw baseline never waits for them.
settle() {
  local pid hz a b
  sync
  pid=$(pgrep -o beam.smp) || return 0
  hz=$(getconf CLK_TCK)
  for _ in $(seq 1 30); do
    a=$(awk '{print $14 + $15}' "/proc/$pid/stat") || return 0
    sleep 1
    b=$(awk '{print $14 + $15}' "/proc/$pid/stat") || return 0
    (( (b - a) * 10 < hz )) && return 0 # under 10% of one core
  done
  echo "the broker stayed busy for 30 s; measuring anyway"
}
step() { settle; phase "$@" || FAILED+=("$1"); }
# A step whose wall time is part of its figure: T0 and T1 bracket the command alone, not the settle.
timed_step() { settle; T0=$(date +%s.%N); phase "$@" || FAILED+=("$1"); T1=$(date +%s.%N); }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average before: $LOAD_BEFORE ($(nproc) CPUs)"
T_START=$SECONDS

# The store: generated through the store's recording path, then timed (see bench/src/store.rs).
store_scenario() {
  PREFIXES+=("$PREFIX-st-sqlite" "$PREFIX-st-postgres")
  step "store ($STORE_JOBS jobs, SQLite and PostgreSQL)" bash -c "'$BENCH' --work-dir '$RUN' store --jobs $STORE_JOBS --prefix '$PREFIX-st' > '$RAW/store.json'"
}
# Fairness: fair share, tiers and coalescing on one 4-slot worker (bench/src/fairness.rs); ~3 min.
fairness_scenario() {
  local backlog=5000 tp=3000
  [[ $QUICK == 1 ]] && { backlog=2000; tp=1000; }
  PREFIXES+=("$PREFIX-fa-af" "$PREFIX-fa-ap" "$PREFIX-fa-h" "$PREFIX-fa-c" "$PREFIX-fa-tf" "$PREFIX-fa-tp")
  step "fairness (backlog $backlog, 50 bots; high priority; coalescing; throughput $tp)" bash -c "'$BENCH' --work-dir '$RUN' fairness --prefix '$PREFIX-fa' --backlog $backlog --throughput-jobs $tp > '$RAW/fairness.json'"
}
finish() {
  LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
  python3 bench/python/report.py "$RAW" "$OUT/results.json" "$LOAD_BEFORE" "$LOAD_AFTER" "$((SECONDS - T_START))" "$QUICK"
  if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "failed scenarios (see $RUN/logs and the output above): ${FAILED[*]}" >&2
    exit 1
  fi
}
if [[ $ONLY == store ]]; then
  store_scenario
  finish
  exit 0
fi
if [[ $ONLY == fairness ]]; then
  fairness_scenario
  finish
  exit 0
fi

# 1. Dispatch: trainyard and raw, interleaved so both see the same machine. The artifact
#    store (outcome records, attempt logs) is a directory on disk, as on a laptop.
SHAPE="--jobs $JOBS --workers $WORKERS --concurrency $SLOTS --submitters $SUBMITTERS"
for i in $(seq 1 "$REPEAT"); do
  PREFIXES+=("$PREFIX-d$i" "$PREFIX-r$i")
  step "dispatch trainyard #$i ($JOBS jobs)" bash -c "'$BENCH' dispatch --prefix '$PREFIX-d$i' $SHAPE > '$RAW/dispatch-$i.json'"
  step "dispatch raw #$i ($JOBS jobs)" bash -c "'$BENCH' dispatch --raw --prefix '$PREFIX-r$i' $SHAPE > '$RAW/raw-$i.json'"
done
# The same with the artifact store on tmpfs: how much of the gap is this disk's file creation.
if [[ -d /dev/shm && -w /dev/shm ]]; then
  PREFIXES+=("$PREFIX-dt")
  step "dispatch trainyard, artifacts on tmpfs ($JOBS jobs)" bash -c "'$BENCH' --artifacts-root '$SHM' dispatch --prefix '$PREFIX-dt' $SHAPE > '$RAW/dispatch-tmpfs.json'"
  rm -rf "$SHM"
fi

# 2. Celery: prefork pool with one child per CPU (its default), prefetch 1, late acks, quorum queue, confirms.
# The worker's one disk write per job, alone: a durable create-once outcome record (fsync of the
# record and its directory) on the scratch disk, not tmpfs.
step "outcome records (2,000, 64 at a time)" bash -c "'$BENCH' outcomes --records 2000 --concurrency 64 > '$RAW/outcomes.json'"

step "celery ($CELERY_JOBS jobs)" bash -c "BENCH_CELERY_QUEUE='$PREFIX-celery' '$VENV/bin/python' bench/python/celery_bench.py $CELERY_KEEP --jobs $CELERY_JOBS --publishers $SUBMITTERS --log-dir '$RUN' > '$RAW/celery.json'"
# The same with task events, results in the local Redis and an event monitor.
step "celery with events and results ($CELERY_JOBS jobs)" bash -c "BENCH_CELERY_QUEUE='$PREFIX-celery' '$VENV/bin/python' bench/python/celery_bench.py $CELERY_KEEP --events --jobs $CELERY_JOBS --publishers $SUBMITTERS --log-dir '$RUN' > '$RAW/celery-events.json'"

# 3. Pickup latency.
PREFIXES+=("$PREFIX-p" "$PREFIX-pr" "$PREFIX-f")
step "pickup trainyard ($PICKUP_JOBS jobs)" bash -c "'$BENCH' pickup --prefix '$PREFIX-p' --jobs $PICKUP_JOBS > '$RAW/pickup.json'"
step "pickup raw ($PICKUP_JOBS jobs)" bash -c "'$BENCH' pickup --raw --prefix '$PREFIX-pr' --jobs $PICKUP_JOBS > '$RAW/pickup-raw.json'"

# 4. Footprint: idle RSS once connected and consuming.
step "footprint trainyard-worker" bash -c "TRAINYARD_PREFIX='$PREFIX-f' TRAINYARD_ARTIFACTS='$RUN/$PREFIX-f' '$BENCH' rss --name worker-footprint \
  --queue '$PREFIX-f.jobs.noop' --queue '$PREFIX-f.jobs.intent-train' --queue '$PREFIX-f.jobs.intent-eval' \
  -- target/release/trainyard-worker run --types noop,intent-train,intent-eval > '$RAW/footprint.json'"
"$BENCH" cleanup "$PREFIX-f" || true
step "footprint celery (solo)" bash -c "cd bench/python && BENCH_CELERY_QUEUE='$PREFIX-fc' PYTHONPATH=. \
  ../../$BENCH --work-dir ../../$RUN rss --name celery-footprint --queue '$PREFIX-fc' \
  -- ../../$VENV/bin/celery -A tasks worker -P solo -Q '$PREFIX-fc' --without-gossip --without-mingle --without-heartbeat -l warning > '../../$RAW/footprint-celery.json'"
BENCH_CELERY_QUEUE="$PREFIX-fc" "$VENV/bin/python" bench/python/celery_bench.py --cleanup-only $CELERY_KEEP || true

# 5. Training: the whole trainyard-worker process vs scikit-learn, one after the other.
TRAIN_DIR=$RUN/$PREFIX-train
rm -rf "$TRAIN_DIR"
timed_step "training trainyard (clinc150 full)" bash -c "TRAINYARD_ARTIFACTS='$RUN/$PREFIX-train-artifacts' target/release/trainyard-worker train \
  --job-file examples/jobs/clinc150-full.json --out '$TRAIN_DIR' > '$RUN/train.log' 2>&1"
python3 -c "import json,sys; m=json.load(open('$TRAIN_DIR/metrics.json')); m['wall_s']=$T1-$T0; print(json.dumps(m))" > "$RAW/training.json" || rm -f "$RAW/training.json"
step "training scikit-learn (clinc150 full)" bash -c "'$VENV/bin/python' bench/python/sklearn_bench.py --data data/clinc150/data_full.json > '$RAW/sklearn.json'"

# 6. Scaling (each point deletes its own queues).
step "scaling (workers $SCALING_WORKERS x slots $SCALING_SLOTS, $SCALING_JOBS jobs)" bash -c "'$BENCH' scaling --prefix '$PREFIX-s' --jobs $SCALING_JOBS \
  --workers $SCALING_WORKERS --slots $SCALING_SLOTS --submitters $SUBMITTERS > '$RAW/scaling.json'"

# 7. The store.
store_scenario

# 7b. Fairness between bots.
fairness_scenario

# 8. GPU: CUDA epoch time vs CPU, only where a GPU is present.
if [[ $GPU == 1 ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    phase "cuda build" cargo build --release -p trainyard-worker --features cuda --target-dir target/cuda
    python3 -c "import json; j=json.load(open('examples/jobs/clinc150-full.json')); j['params']['device']='cuda'; print(json.dumps(j))" > "$RUN/clinc150-cuda.json"
    for dev in cpu cuda; do
      job=examples/jobs/clinc150-full.json; bin=target/release/trainyard-worker
      [[ $dev == cuda ]] && { job=$RUN/clinc150-cuda.json; bin=target/cuda/release/trainyard-worker; }
      timed_step "training on $dev" "$bin" train --job-file "$job" --out "$RUN/$PREFIX-gpu-$dev" > "$RUN/train-$dev.log" 2>&1
      python3 -c "import json; m=json.load(open('$RUN/$PREFIX-gpu-$dev/metrics.json')); print(json.dumps({'wall_s': $T1-$T0, 'in_scope_accuracy': m.get('in_scope_accuracy')}))" > "$RAW/gpu-$dev.json" || rm -f "$RAW/gpu-$dev.json"
    done
  else
    echo "--gpu: no GPU found (nvidia-smi); skipping the CUDA comparison"
  fi
fi

finish
