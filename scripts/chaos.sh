#!/usr/bin/env bash
# Chaos run: no job lost, no result recorded twice, whatever happens to workers and broker.
#
#   scripts/chaos.sh [--jobs N] [--workers W] [--duration S]     (default 200 jobs, 3 workers, 60 s of chaos)
#   scripts/chaos.sh --flood                                      (resource bounds; see below)
#   scripts/chaos.sh --cluster [--jobs N ...]                     (against the 3-node cluster; see below)
#
# Starts the control plane (`trainyard serve`, SQLite store) and W workers on a
# unique topology prefix with temporary artifact and data directories, submits
# N jobs (mostly `noop` with random `sleep_ms`, a few transient and permanent
# failures, and N/200+1 small `intent-train` jobs; the noop jobs mix bots under fair share,
# priorities, and a tenth of them share one of two coalescing keys), and for S seconds:
# SIGKILLs random workers and starts replacements, SIGTERMs others, closes
# every client connection at the broker (`rabbitmqctl close_all_connections`)
# and restarts the broker application once (`stop_app`/`start_app`; start_app
# is also in the exit trap: the broker is never left stopped). Then it waits
# until every job has a final status in the store, checks the store against
# the artifact store, prints ONE JSON line (last) and exits non-zero unless the
# verdict of scripts/chaos_check.py passes: succeeded == expected_succeeded,
# dead == expected_dead, no job lost or result duplicated, the newest job of each
# coalescing key succeeded and the older ones were superseded (or finished first), a training job killed
# after a checkpoint resumed from it, and every planned fault really happened.
#
# --flood: (1) 100,000 queued noop jobs and one worker: its RSS, sampled every
# second, stays flat (prefetch, not queue length, bounds it); (2) a training
# job SIGKILLed mid-epoch again and again resumes from its checkpoint each
# time and ends `dead` at the broker's delivery limit with a clear reason;
# (3) a job past its timeout_s fails cleanly (`failed`, kind timeout).
# CHAOS_FLOOD_PARTS="memory kill timeout" picks parts; CHAOS_FLOOD_JOBS (100000)
# and CHAOS_FLOOD_SECONDS (120) size the first, which fails when the worker's RSS
# grows by more than CHAOS_FLOOD_RSS_GROWTH_MB (4) after its first 15 s; each part
# fails unless what it shows happened.
#
# --cluster: the same run against the local 3-node cluster of scripts/cluster.sh (started
# if it is not running, stopped again at the end if this run started it), clients given
# all three node URLs; besides the faults above, twice it stops the node leading the quorum
# of the `noop` job queue (`cluster.sh leader`), then brings it back after 5 s. The JSON line adds
# leader_stops and leader_stop_recovery_s (node stop to the next job completion); the verdict
# also fails when no job completed within CHAOS_RECOVERY_BOUND_S (10) of a stop.
#
# Disrupts the shared broker (every connection is closed, the app restarted):
# run it alone. Needs rabbitmqctl (as root or a user allowed to run it) and python3.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

JOBS=200 WORKERS=3 DURATION=60 FLOOD=0 CLUSTER=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --jobs) JOBS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --flood) FLOOD=1; shift ;;
    --cluster) CLUSTER=1; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "[chaos $(date +%T)] $*" >&2; }

if [[ ${CHAOS_BUILD:-1} != 0 ]]; then
  log "building binaries"
  # The whole workspace, as scripts/test.sh builds and tests it: selecting packages (-p) resolves
  # their dependencies' features apart and compiles many of them a second time.
  cargo build -q --workspace --bins --tests --examples || exit 1
fi
T_START=$SECONDS
BIN=$ROOT/target/debug
HELPER=$BIN/examples/chaos
command -v rabbitmqctl >/dev/null || { echo "rabbitmqctl not found" >&2; exit 1; }

# rabbitmqctl against the broker under test: the usual one, or a running node of the cluster.
CLUSTER_STARTED=0 STOPPED_NODE="" LEADER_STOPS=0 STOP_TIMES=""
if [[ $CLUSTER == 1 ]]; then
  [[ $FLOOD == 1 ]] && { echo "--cluster and --flood do not combine" >&2; exit 2; }
  rmqctl() { scripts/cluster.sh ctl "$@"; }
  if ! scripts/cluster.sh status >/dev/null 2>&1; then
    log "starting the 3-node cluster (scripts/cluster.sh start)"
    # A start that failed half-way leaves nodes running: stopped here (the exit trap comes later).
    scripts/cluster.sh start >/dev/null || { log "the cluster did not start; stopping what did"; scripts/cluster.sh stop >/dev/null 2>&1; exit 1; }
    CLUSTER_STARTED=1
  fi
  TRAINYARD_AMQP_URL=$(scripts/cluster.sh urls)
else
  # Debian's rabbitmqctl runs only as root or rabbitmq: a user it refuses goes through sudo
  # (never prompting), or every planned connection close failed and the verdict with it.
  if [[ $(id -u) -eq 0 ]] || rabbitmqctl -q status >/dev/null 2>&1; then
    rmqctl() { rabbitmqctl "$@"; }
  else
    rmqctl() { sudo -n rabbitmqctl "$@"; }
  fi
fi

PREFIX="chaos-$(date +%s)-$$"
TMP=$(mktemp -d /tmp/trainyard-chaos.XXXXXX)
export TRAINYARD_PREFIX=$PREFIX
export TRAINYARD_ARTIFACTS=$TMP/artifacts
export TRAINYARD_DATA_DIR=$TMP/data
export TRAINYARD_DATABASE_URL=sqlite://$TMP/store.db
export TRAINYARD_AMQP_URL=${TRAINYARD_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export TRAINYARD_LOG_FORMAT=json
mkdir -p "$TMP/artifacts" "$TMP/data"
cp -r "$ROOT/data/clinc150" "$TMP/data/"
IDS=$TMP/ids.txt RSS_LOG=$TMP/rss.log PIDS=$TMP/worker.pids
: >"$PIDS"
TYPES=noop,intent-train

BROKER_STOPPED=0 SERVE_PID="" SAMPLER_PID=""
declare -a WPIDS=()
NEXT_WORKER=0 KILLS=0 TERMS=0 CLOSES=0 RESTARTS=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ $BROKER_STOPPED == 1 ]]; then
    log "restoring the broker (start_app)"
    rmqctl start_app >/dev/null 2>&1
    rmqctl await_startup >/dev/null 2>&1
  fi
  [[ -n $STOPPED_NODE ]] && { log "restarting cluster node $STOPPED_NODE"; scripts/cluster.sh start-node "$STOPPED_NODE"; }
  for pid in "${WPIDS[@]}" $SERVE_PID; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${WPIDS[@]}" $SERVE_PID; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
  wait 2>/dev/null
  # Every queue of the prefix (also retry queues), then the exchanges.
  rmqctl list_queues -q --no-table-headers name 2>/dev/null | grep "^$PREFIX\." | while read -r q; do
    rmqctl delete_queue "$q" </dev/null >/dev/null 2>&1
  done
  "$HELPER" cleanup --types "$TYPES" >/dev/null 2>&1
  if [[ ${CHAOS_KEEP:-0} == 1 || $rc != 0 ]]; then log "kept logs and stores in $TMP"; else rm -rf "$TMP"; fi
  [[ $CLUSTER_STARTED == 1 ]] && scripts/cluster.sh stop
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

worker_args=(run --types "$TYPES" --concurrency "${CHAOS_CONCURRENCY:-4}" --grace-period 3 --retry-base-ms 200 --retry-max-ms 2000)

start_worker() {
  local n=$NEXT_WORKER
  NEXT_WORKER=$((n + 1))
  "$BIN/trainyard-worker" "${worker_args[@]}" >"$TMP/worker-$n.log" 2>&1 &
  WPIDS+=($!)
  echo $! >>"$PIDS"
}

# The live workers (those not yet exited).
alive() {
  local pid
  for pid in "${WPIDS[@]}"; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done
}

random_alive() {
  local a
  mapfile -t a < <(alive)
  [[ ${#a[@]} -gt 0 ]] && echo "${a[RANDOM % ${#a[@]}]}"
}

# Every second: "<seconds> <pid> <rss kB>" of each live worker.
start_sampler() {
  (
    t0=$SECONDS
    while true; do
      while read -r pid; do
        rss=$(ps -o rss= -p "$pid" 2>/dev/null | tr -d ' ')
        [[ -n $rss ]] && echo "$((SECONDS - t0)) $pid $rss"
      done <"$PIDS"
      sleep 1
    done
  ) >"$RSS_LOG" 2>/dev/null &
  SAMPLER_PID=$!
}

start_serve() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # With "tenants": noop jobs go through fair-share admission (the chaos jobs mix bots and
  # priorities) and latest wins also cancels a running older job of a coalescing key.
  local config=()
  if [[ ${1:-} == tenants ]]; then
    printf '[policy.noop]\nfair_share = true\nsupersede_running = true\n' >"$TMP/serve.toml"
    config=(--config "$TMP/serve.toml")
  fi
  "$BIN/trainyard" serve --listen "127.0.0.1:$port" --types "$TYPES" "${config[@]}" >"$TMP/serve.log" 2>&1 &
  SERVE_PID=$!
  sleep 2
  kill -0 "$SERVE_PID" 2>/dev/null || { log "trainyard serve did not start: $(tail -3 "$TMP/serve.log")"; return 1; }
}

queue_depth() {
  rmqctl list_queues -q --no-table-headers name messages 2>/dev/null | awk -v q="$1" '$1 == q {print $2}'
}

# The noop work queues of every priority tier: `submit --plain` gives one job in ten each to
# the high and the low tier.
noop_queues() { echo "$PREFIX.jobs.noop" "$PREFIX.jobs.noop.high" "$PREFIX.jobs.noop.low"; }

# Messages in every noop tier queue; fails when a depth cannot be read (it counted as 0, and a
# worker that took nothing passed the flood as having processed every job).
noop_depth() {
  local total=0 q d
  for q in $(noop_queues); do
    d=$(queue_depth "$q")
    [[ $d =~ ^[0-9]+$ ]] || { echo "could not read the depth of $q" >&2; return 1; }
    total=$((total + d))
  done
  echo "$total"
}

close_connections() {
  log "closing every client connection at the broker"
  rmqctl close_all_connections "chaos" >/dev/null 2>&1 && CLOSES=$((CLOSES + 1))
}

restart_broker() {
  log "restarting the broker application (stop_app / start_app)"
  BROKER_STOPPED=1
  # Counted only when the broker really stopped and came back.
  if rmqctl stop_app >/dev/null 2>&1; then
    sleep 3
    rmqctl start_app >/dev/null 2>&1 && rmqctl await_startup >/dev/null 2>&1 && BROKER_STOPPED=0 && RESTARTS=$((RESTARTS + 1))
  else
    log "stop_app failed: the restart is not counted"
  fi
  if ((BROKER_STOPPED)); then rmqctl start_app >/dev/null 2>&1 && rmqctl await_startup >/dev/null 2>&1 && BROKER_STOPPED=0; fi
}

# Stops the node leading the quorum of the noop job queue, and starts it again 5 s later.
stop_leader() {
  local leader n t
  leader=$(scripts/cluster.sh leader "$PREFIX.jobs.noop") || { log "no leader found for $PREFIX.jobs.noop: not counted"; return 0; }
  n=${leader#trainyard-c}
  n=${n%@*}
  log "stopping $leader, the leader of $PREFIX.jobs.noop"
  t=$(date +%s.%N)
  STOPPED_NODE=$n
  if scripts/cluster.sh stop-node "$n"; then
    LEADER_STOPS=$((LEADER_STOPS + 1))
    STOP_TIMES+="$t,"
  fi
  sleep 5
  log "starting $leader again"
  scripts/cluster.sh start-node "$n" && STOPPED_NODE=""
}

kill_worker() {
  local pid
  pid=$(random_alive) || return 0
  log "SIGKILL worker $pid; starting a replacement"
  kill -KILL "$pid" 2>/dev/null && KILLS=$((KILLS + 1))
  wait "$pid" 2>/dev/null # reap it quietly
  start_worker
}

term_worker() {
  local pid
  pid=$(random_alive) || return 0
  log "SIGTERM worker $pid; starting a replacement"
  kill -TERM "$pid" 2>/dev/null && TERMS=$((TERMS + 1))
  start_worker
}

# ---------------------------------------------------------------------------
chaos_run() {
  local slots=$((WORKERS * ${CHAOS_CONCURRENCY:-4})) work_s=$DURATION
  # Each leader stop holds the plan up for ~25 s (stop, 5 s down, start): the work lasts that much longer.
  [[ $CLUSTER == 1 ]] && work_s=$((DURATION + 50))
  # Pace the noop jobs so the work lasts about as long as the chaos: avg sleep = duration * slots / jobs * 0.9.
  local avg=$((work_s * 1000 * slots * 9 / 10 / JOBS))
  ((avg < 20)) && avg=20
  ((avg > 15000)) && avg=15000
  local intent=$((JOBS / 200 + 1))
  start_serve tenants || return 1
  "$BIN/trainyard" topology --types "$TYPES" 2>/dev/null || { log "cannot declare the topology"; return 1; }
  for _ in $(seq "$WORKERS"); do start_worker; done
  start_sampler
  log "prefix $PREFIX, $WORKERS workers, submitting $JOBS noop (sleep $((avg / 4))..$((avg * 7 / 4)) ms) + $intent intent-train jobs"
  "$HELPER" submit --count "$JOBS" --intent "$intent" --sleep-ms "$((avg / 4))..$((avg * 7 / 4))" --out "$IDS" --seed "$$" || return 1
  # Twelve disruptions spread over the duration: 6 SIGKILLs, 3 SIGTERMs, 2 connection closes, 1 broker restart;
  # with --cluster the restart is node 1's application, and 2 leader stops come on top.
  local plan=(kill term kill close kill restart kill term kill close kill term) extra=()
  [[ $CLUSTER == 1 ]] && plan=(kill leader term kill close kill restart leader kill term kill close kill term)
  local step=$((DURATION * 10 / ${#plan[@]})) # tenths of a second
  local t0=$SECONDS action
  for action in "${plan[@]}"; do
    sleep "$((step / 10)).$((step % 10))"
    case $action in
      kill) kill_worker ;;
      term) term_worker ;;
      close) close_connections ;;
      restart) restart_broker ;;
      leader) stop_leader ;;
    esac
  done
  log "chaos over after $((SECONDS - t0)) s; waiting for every job to reach a final status"
  local deadline=$((SECONDS + ${CHAOS_SETTLE:-$((DURATION * 3 + 120))}))
  local final total
  while ((SECONDS < deadline)); do
    read -r final total < <(python3 scripts/chaos_check.py progress "$IDS" "$TRAINYARD_DATABASE_URL")
    log "final: $final / $total"
    [[ $final == "$total" ]] && break
    # Keep the pool at W live workers (SIGTERMed ones exit on their own).
    while (($(alive | wc -l) < WORKERS)); do start_worker; done
    sleep 3
  done
  # Let the recorder read the rest of the events stream (its stored position stops moving), then judge.
  local pos=-2 now
  for _ in $(seq 20); do
    now=$(python3 scripts/chaos_check.py position "$TRAINYARD_DATABASE_URL")
    [[ $now == "$pos" ]] && break
    pos=$now
    sleep 1
  done
  [[ $CLUSTER == 1 ]] && extra=("leader_stops=$LEADER_STOPS" "planned_leader_stops=2" "recovery_bound_s=${CHAOS_RECOVERY_BOUND_S:-10}"
    "leader_stop_times=${STOP_TIMES%,}")
  python3 scripts/chaos_check.py verdict "$IDS" "$TRAINYARD_DATABASE_URL" "$TRAINYARD_ARTIFACTS" "$RSS_LOG" \
    "kills=$KILLS" "sigterms=$TERMS" "connection_closes=$CLOSES" "broker_restarts=$RESTARTS" "seconds=$((SECONDS - T_START))" \
    "planned_kills=6" "planned_sigterms=3" "planned_connection_closes=2" "planned_broker_restarts=1" \
    ${extra[@]+"${extra[@]}"}
}

# ---------------------------------------------------------------------------
flood_memory() {
  local n=${CHAOS_FLOOD_JOBS:-100000} secs=${CHAOS_FLOOD_SECONDS:-120}
  "$BIN/trainyard" topology --types "$TYPES" 2>/dev/null || return 1
  log "flood: queueing $n noop jobs"
  "$HELPER" submit --count "$n" --plain --out "$TMP/flood-ids.txt" --concurrency 128 || return 1
  log "flood: queue depth $(noop_depth); one worker (concurrency 4) for $secs s, RSS sampled every second"
  start_worker
  start_sampler
  sleep "$secs"
  local left
  left=$(noop_depth) || left=""
  # The sampler stops before the worker does: a worker shutting down frees memory, and those
  # samples read as a swing of the RSS (they failed a run whose RSS never rose).
  kill "$SAMPLER_PID" 2>/dev/null
  wait "$SAMPLER_PID" 2>/dev/null
  SAMPLER_PID=""
  kill -TERM "${WPIDS[@]}" 2>/dev/null
  wait "${WPIDS[@]}" 2>/dev/null
  # RSS after the first 15 s vs its highest before: flat means the later max stays near the
  # early one. Fails when the worker's RSS rises more than CHAOS_FLOOD_RSS_GROWTH_MB (4) above
  # its highest from 5 to 15 s; memory given back (the queue drained) is not growth.
  python3 - "$RSS_LOG" "$n" "$left" "$secs" "${CHAOS_FLOOD_RSS_GROWTH_MB:-4}" <<'EOF' || return 1
import json, sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 3]
mb = lambda kb: round(kb / 1024, 1)
early = [r for t, _, r in rows if 5 <= t < 15] or [r for _, _, r in rows]
late = [r for t, _, r in rows if t >= 15] or early
if not sys.argv[3]:
    sys.exit("flood: the jobs left in the queues could not be read")
n, left, secs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(json.dumps({"flood_queued": n, "processed": n - left, "seconds": secs, "rss_mb_min": mb(min(r for _, _, r in rows)),
                  "rss_mb_max": mb(max(r for _, _, r in rows)), "rss_mb_at_10s": mb(early[len(early) // 2]),
                  "rss_mb_last": mb(rows[-1][2]), "rss_growth_after_15s_mb": mb(max(0, max(late) - max(early)))}, separators=(",", ":")))
bound = float(sys.argv[5])
if n - left <= 0:
    sys.exit("flood: the worker processed no job")
growth = mb(max(0, max(late) - max(early)))
if growth > bound:
    sys.exit(f"flood: RSS rose {growth} MB above its first 15 s after them (bound {bound} MB)")
EOF
  # Drop the rest of the flood before the next part (its events stay in the stream; the recorder reads on).
  local q
  for q in $(noop_queues); do
    rmqctl purge_queue "$q" >/dev/null 2>&1
  done
  WPIDS=()
  : >"$PIDS"
}

# A training job SIGKILLed mid-run, again and again: resumes from its checkpoint
# each time; at the broker's delivery limit it is dead-lettered, recorded `dead`.
flood_kill_loop() {
  start_serve || return 1
  local id epochs=200
  echo '{"dataset":"clinc150/data_small.json","epochs":'$epochs',"patience":1000,"seed":7,"promote":"manual"}' >"$TMP/kill-params.json"
  id=$("$BIN/trainyard" submit intent-train --bot chaos-oom --params-file "$TMP/kill-params.json" --max-attempts 3 --timeout 3600 2>/dev/null | tail -1)
  [[ -n $id ]] || { log "submit failed"; return 1; }
  log "kill loop: training job $id ($epochs epochs); SIGKILL after each new checkpoint"
  local ck="$TRAINYARD_ARTIFACTS/jobs/$id/checkpoints/latest.json" last=0 kills=0 epochs_at_kill=() status=""
  while ((kills < 40)); do
    start_worker
    local pid=${WPIDS[-1]} t0=$SECONDS epoch=$last
    # Wait for a checkpoint newer than the last one, or for the job to leave the queue for good.
    while ((SECONDS - t0 < 90)); do
      epoch=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["epoch"])' "$ck" 2>/dev/null || echo 0)
      ((epoch > last)) && break
      status=$("$BIN/trainyard" jobs show "$id" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' 2>/dev/null)
      [[ $status == dead || $status == failed || $status == succeeded ]] && break
      sleep 0.3
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    [[ $status == dead || $status == failed || $status == succeeded ]] && break
    kills=$((kills + 1))
    epochs_at_kill+=("$epoch")
    ((epoch < last)) && { log "checkpoint went back from epoch $last to $epoch: not resumed"; return 1; }
    last=$epoch
  done
  # The broker dead-letters the job at its delivery limit; the recorder records `dead`.
  for _ in $(seq 30); do
    status=$("$BIN/trainyard" jobs show "$id" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' 2>/dev/null)
    [[ $status == dead ]] && break
    sleep 1
  done
  "$BIN/trainyard" jobs show "$id" --json >"$TMP/kill-job.json" 2>/dev/null
  python3 - "$TMP/kill-job.json" "$kills" "${epochs_at_kill[*]}" <<'EOF' || return 1
import json, sys
job = json.load(open(sys.argv[1])) if open(sys.argv[1]).read().strip() else {}
epochs = [int(e) for e in sys.argv[3].split()]
err = job.get("error") or {}
print(json.dumps({"kill_loop_job": job.get("job_id"), "status": job.get("status"), "sigkills": int(sys.argv[2]),
                  "checkpoint_epoch_at_each_kill": epochs, "resumed_every_time": epochs == sorted(epochs) and len(set(epochs)) == len(epochs),
                  "reason": err.get("message") if isinstance(err, dict) else err}, separators=(",", ":")))
if job.get("status") != "dead" or not (epochs == sorted(epochs) and len(set(epochs)) == len(epochs)) or not epochs:
    sys.exit("kill loop: the job did not resume at every kill and end dead")
EOF
}

# A job past its timeout_s: stopped, `failed` with kind timeout, no retry left.
flood_timeout() {
  start_worker
  local out
  out=$("$BIN/trainyard" submit noop --bot chaos --param sleep_ms=600000 --timeout 2 --max-attempts 1 --wait --json --wait-timeout 120 2>/dev/null)
  echo "$out" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(json.dumps({"timeout_job": v.get("job_id"), "status": v.get("status"), "error": v.get("error")}, separators=(",", ":"))); sys.exit(0 if v.get("status") == "failed" and (v.get("error") or {}).get("kind") == "timeout" else "timeout: the job did not end failed with kind timeout")'
}

if [[ $FLOOD == 1 ]]; then
  # CHAOS_FLOOD_PARTS picks parts (default all three).
  for part in ${CHAOS_FLOOD_PARTS:-memory kill timeout}; do
    case $part in
      memory) flood_memory || exit 1 ;;
      kill) flood_kill_loop || exit 1 ;;
      timeout) flood_timeout || exit 1 ;;
    esac
  done
  exit 0
fi
chaos_run
