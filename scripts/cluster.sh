#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster beside the usual broker, for failover and leader-kill tests.
#
#   scripts/cluster.sh start             start the three nodes (installing RabbitMQ when missing) and cluster them
#   scripts/cluster.sh stop              stop the three nodes (their data stays under target/cluster/)
#   scripts/cluster.sh status            one line per node: `<node name> <amqp url> running|stopped`;
#                                        exit 0 only when all three run and are clustered
#   scripts/cluster.sh urls              the three AMQP URLs on one line (a TRAINYARD_AMQP_URL value)
#   scripts/cluster.sh stop-node N       stop node N (1..3) only;  start-node N: start it again and wait
#   scripts/cluster.sh leader QUEUE      the node leading the quorum queue QUEUE
#   scripts/cluster.sh ctl ARGS...       rabbitmqctl against the first node whose Erlang VM answers
#
# Nodes trainyard-c1..3@localhost, AMQP ports CLUSTER_PORT (5681)..+2 on 127.0.0.1, Erlang
# distribution ports 20000 above them; data, logs and configuration under target/cluster/nN,
# one Erlang cookie in target/cluster/cookie, passed explicitly (-setcookie, --erlang-cookie):
# the usual broker (5672/15672/25672, rabbit@localhost) and its ~/.erlang.cookie are never touched.
# Lean for a small machine: one Erlang scheduler per node, no plugins (no management
# port: the leader is found with rabbitmqctl), a 256 MiB memory watermark.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ROOT=$PWD/target/cluster
BASE=${CLUSTER_PORT:-5681}
NODES=(1 2 3)

die() { echo "error: $*" >&2; exit 1; }
node_name() { echo "trainyard-c$1@localhost"; }
amqp_port() { echo $((BASE + $1 - 1)); }
amqp_url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }

# The RabbitMQ scripts themselves, not Debian's wrapper (which switches to the rabbitmq user).
rmq_bin() {
  if [[ -x /usr/lib/rabbitmq/bin/$1 ]]; then echo "/usr/lib/rabbitmq/bin/$1"; else command -v "$1"; fi
}

ensure_installed() {
  command -v rabbitmq-server >/dev/null || [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] && return 0
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || die "rabbitmq-server is not installed (sudo apt-get install rabbitmq-server)"
  echo "installing rabbitmq-server with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
}

cookie() {
  if [[ ! -s $ROOT/cookie ]]; then
    mkdir -p "$ROOT"
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT/cookie")
  fi
  cat "$ROOT/cookie"
}

# Runs CMD with the environment of node N (its own env file, config, directories and ports).
with_node_env() {
  local n=$1 dir=$ROOT/n$1; shift
  env RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$(amqp_port "$n")" RABBITMQ_DIST_PORT="$(($(amqp_port "$n") + 20000))" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_MNESIA_BASE="$dir/data" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-setcookie $(cookie) +S 1:1 +A 4" "$@"
}

ctl() { # ctl N ARGS...: rabbitmqctl against node N
  local n=$1; shift
  ERL_EPMD_ADDRESS=127.0.0.1 "$(rmq_bin rabbitmqctl)" --erlang-cookie "$(cookie)" -n "$(node_name "$n")" "$@"
}

write_config() {
  local dir=$ROOT/n$1
  mkdir -p "$dir/data" "$dir/log"
  : >"$dir/rabbitmq-env.conf"
  echo '[].' >"$dir/enabled_plugins"
  echo '[].' >"$dir/advanced.config"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$1")
loopback_users = none
vm_memory_high_watermark.absolute = 256MiB
disk_free_limit.absolute = 200MB
consumer_timeout = 7200000
cluster_partition_handling = pause_minority
EOF
}

# Node N's RabbitMQ application runs (status needs it); its Erlang VM answers (ping does not).
running() { ctl "$1" -q --timeout 10 status >/dev/null 2>&1; }
vm_up() { ctl "$1" -q --timeout 10 ping >/dev/null 2>&1; }

start_node() {
  local n=$1
  running "$n" && return 0
  # The VM is up with the application stopped (rabbitmqctl stop_app): start the application.
  vm_up "$n" && { ctl "$n" -q start_app >/dev/null 2>&1; return 0; }
  write_config "$n"
  with_node_env "$n" "$(rmq_bin rabbitmq-server)" -detached >"$ROOT/n$n/log/start.out" 2>&1
}

# Waits up to 120 s for node N to boot (await_startup fails at once while the node is not up yet).
await_node() {
  local deadline=$((SECONDS + 120))
  until ctl "$1" -q --timeout 10 await_startup >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$(node_name "$1") did not start: see $ROOT/n$1/log"
    sleep 1
  done
}

# Node N's view of the running cluster members, one per line.
members() {
  ctl "$1" -q --timeout 10 eval 'lists:sort(rabbit_nodes:all_running()).' 2>/dev/null | tr -d "[]'\n" | tr ',' '\n'
}

clustered() {
  local want
  want=$(for n in "${NODES[@]}"; do node_name "$n"; done | sort | tr '\n' ' ')
  [[ $(members 1 | sort | tr '\n' ' ') == "$want" ]]
}

join() { # join N: node N joins node 1's cluster unless it is in it already
  members 1 | grep -qx "$(node_name "$1")" && return 0
  ctl "$1" -q stop_app >/dev/null && ctl "$1" -q join_cluster "$(node_name 1)" >/dev/null && ctl "$1" -q start_app >/dev/null \
    || die "$(node_name "$1") could not join $(node_name 1)"
}

cmd_start() {
  ensure_installed
  for n in "${NODES[@]}"; do
    port_open "$(amqp_port "$n")" && ! running "$n" && die "port $(amqp_port "$n") is taken by something else (set CLUSTER_PORT)"
  done
  # Started together: nodes of an existing cluster wait for each other at boot.
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in 2 3; do join "$n"; done
  clustered || die "the nodes did not form one cluster: $(members 1 | tr '\n' ' ')"
  cmd_status
}

# Every node whose VM answers, also one whose application is stopped: the last node standing
# pauses itself (pause_minority) rather than run alone.
cmd_stop() {
  for n in "${NODES[@]}"; do
    vm_up "$n" && { ctl "$n" -q shutdown >/dev/null 2>&1 || echo "warning: $(node_name "$n") did not stop cleanly" >&2; }
  done
  return 0
}

cmd_status() {
  local n ok=0
  for n in "${NODES[@]}"; do
    if running "$n"; then echo "$(node_name "$n") $(amqp_url "$n") running"; else echo "$(node_name "$n") $(amqp_url "$n") stopped"; ok=1; fi
  done
  ((ok == 0)) && clustered || { ((ok == 0)) && echo "not clustered: node 1 sees $(members 1 | tr '\n' ' ')" >&2; return 1; }
}

# The node leading quorum queue $1, asked of the first running node.
cmd_leader() {
  local n
  for n in "${NODES[@]}"; do
    running "$n" || continue
    ctl "$n" -q --no-table-headers list_queues name leader 2>/dev/null | awk -v q="$1" '$1 == q {print $2; found=1} END {exit !found}' && return 0
  done
  return 1
}

node_number() { # trainyard-c2@localhost or 2 -> 2
  local n=${1#trainyard-c}; n=${n%@*}
  [[ $n =~ ^[123]$ ]] || die "not a node of this cluster: $1"
  echo "$n"
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  urls) for n in "${NODES[@]}"; do amqp_url "$n"; done | tr '\n' ' ' | sed 's/ $/\n/' ;;
  stop-node) n=$(node_number "${2:-}") && { ctl "$n" -q shutdown >/dev/null 2>&1 || die "could not stop $(node_name "$n")"; } ;;
  start-node) n=$(node_number "${2:-}") && start_node "$n" && await_node "$n" ;;
  leader) [[ -n ${2:-} ]] || die "usage: cluster.sh leader QUEUE"; cmd_leader "$2" ;;
  # The first node whose VM answers, so that stop_app and then start_app reach the same node.
  ctl) n=1; for m in "${NODES[@]}"; do vm_up "$m" && { n=$m; break; }; done; shift; ctl "$n" "$@" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
