# Shared helpers of the scripts: sourced, not run.
# shellcheck shell=bash

# Prints a timing line for a phase: phase NAME CMD...
phase() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== ${name}"
  "$@"
  local rc=$?
  echo "=== ${name}: $((SECONDS - t0)) s (exit ${rc})"
  return $rc
}

# True when something listens on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

# RabbitMQ closes the channel of a delivery unacked for longer than its consumer_timeout
# (30 min by default) and requeues the job; a job's timeout_s may be longer (default 1,500 s). Raises the
# local broker's to 2 h (at run time, rabbitmqctl eval) and tells the workers
# started by the calling script (TRAINYARD_CONSUMER_TIMEOUT_S). A broker rabbitmqctl cannot
# reach keeps its value, and the workers their default (1,800 s).
configure_consumer_timeout() {
  local ms=7200000 set="application:set_env(rabbit, consumer_timeout, 7200000)."
  command -v rabbitmqctl >/dev/null || return 0
  if as_root rabbitmqctl -q eval "$set" >/dev/null 2>&1 || rabbitmqctl -q eval "$set" >/dev/null 2>&1; then
    export TRAINYARD_CONSUMER_TIMEOUT_S=$((ms / 1000))
  fi
}

# Makes sure a RabbitMQ broker answers on localhost:5672: starts the local
# rabbitmq-server if installed, else installs it with apt-get when root.
# Installs Debian packages ($2…) with apt-get when running as root; otherwise prints "error: $1"
# (what is missing, and how to get it) and fails.
apt_install() {
  local why=$1
  shift
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: $why" >&2
    return 1
  fi
}

ensure_rabbitmq() {
  if [[ -n "${TRAINYARD_AMQP_URL:-}" && "${TRAINYARD_AMQP_URL}" != *"127.0.0.1"* && "${TRAINYARD_AMQP_URL}" != *"localhost"* ]]; then
    return 0 # a remote broker was given: the caller knows where it is
  fi
  port_open 5672 && { configure_consumer_timeout; return 0; }
  command -v rabbitmq-server >/dev/null || apt_install "no RabbitMQ on localhost:5672 and rabbitmq-server is not installed;
  install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server) or set TRAINYARD_AMQP_URL." rabbitmq-server || return 1
  echo "starting rabbitmq-server"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    port_open 5672 && { sleep 2; configure_consumer_timeout; return 0; }
    sleep 1
  done
  echo "error: rabbitmq-server did not start listening on 5672 within 90 s" >&2
  return 1
}

# The tests' PostgreSQL: TRAINYARD_TEST_DATABASE_URL when set (used as is), else localhost:5432
# with user postgres and no password (database `test`), installed, started and let in here.
ensure_postgres() {
  [[ -n "${TRAINYARD_TEST_DATABASE_URL:-}" ]] && return 0
  if ! port_open 5432; then
    ls /etc/postgresql/*/main >/dev/null 2>&1 \
      || apt_install "no PostgreSQL on localhost:5432; install postgresql or set TRAINYARD_TEST_DATABASE_URL." postgresql || return 1
    pg_trust_tests
    local v; v=$(ls /etc/postgresql | head -1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start || as_root pg_ctlcluster "$v" main start || true
    # apt-get starts the cluster itself on a systemd machine: then the start above fails and
    # the trust line is not read until a reload.
    as_root pg_ctlcluster "$v" main reload >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do port_open 5432 && break; sleep 1; done
  fi
  port_open 5432 || { echo "error: PostgreSQL did not start" >&2; return 1; }
  command -v psql >/dev/null || return 0
  # A server already running may ask for a password: let the tests in, where this machine's
  # cluster can be configured, then check.
  if ! pg_lets_tests_in && ls /etc/postgresql/*/main >/dev/null 2>&1; then
    pg_trust_tests
    as_root pg_ctlcluster "$(ls /etc/postgresql | head -1)" main reload >/dev/null 2>&1 || true
    sleep 1
  fi
  pg_lets_tests_in || {
    echo "error: PostgreSQL on localhost:5432 refuses user postgres from 127.0.0.1 without a password;" \
      "allow it (trust in pg_hba.conf) or set TRAINYARD_TEST_DATABASE_URL." >&2
    return 1
  }
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null 2>&1 || true
}

# Makes sure Redis answers on localhost:6379 (the bench's Celery result backend), installing
# and starting redis-server where it can; nothing is kept on disk.
ensure_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null \
    || apt_install "no Redis on localhost:6379 and redis-server is not installed (Debian/Ubuntu: sudo apt-get install redis-server)." redis-server \
    || return 1
  echo "starting redis-server"
  redis-server --daemonize yes --port 6379 --bind 127.0.0.1 --save '' --appendonly no >/dev/null
  for _ in $(seq 1 20); do port_open 6379 && return 0; sleep 0.5; done
  echo "error: redis-server did not start listening on 6379" >&2
  return 1
}

# Whether user postgres gets in over 127.0.0.1 without a password.
pg_lets_tests_in() {
  psql -h 127.0.0.1 -U postgres -d postgres -w -tAc 'SELECT 1' >/dev/null 2>&1
}

# Puts a trust line for 127.0.0.1 first in this machine's pg_hba.conf (once; read at the next
# start or reload).
pg_trust_tests() {
  local v; v=$(ls /etc/postgresql | head -1)
  local hba="/etc/postgresql/$v/main/pg_hba.conf"
  if ! grep -q "trainyard-tests" "$hba" 2>/dev/null; then
    as_root sh -c "printf 'host all all 127.0.0.1/32 trust # trainyard-tests\n' | cat - '$hba' > '$hba.new' && mv '$hba.new' '$hba' && chown postgres '$hba'" || true
  fi
}

# Fails with a hint when cargo is missing.
ensure_cargo() {
  command -v cargo >/dev/null && return 0
  [[ -x "$HOME/.cargo/bin/cargo" ]] && { export PATH="$HOME/.cargo/bin:$PATH"; return 0; }
  echo "error: cargo not found; install Rust with https://rustup.rs (stable toolchain)" >&2
  return 1
}

# Makes sure python3 is there (the scripts read JSON with it), installing it as root with apt-get.
ensure_python3() {
  command -v python3 >/dev/null && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing python3 with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null && return 0
  fi
  echo "error: python3 is needed: sudo apt-get install python3" >&2
  return 1
}

# Makes sure promtool (Debian's `prometheus` package) is installed: the alert rules are
# checked and unit-tested with it (scripts/validate-k8s.sh).
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing promtool (package prometheus) with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
      && command -v promtool >/dev/null && return 0
  fi
  echo "error: promtool is needed to check the alert rules: sudo apt-get install prometheus" >&2
  return 1
}

# Makes sure headless Chromium is installed (the report page is tested in it).
# A moto S3 server for the artifact store's S3 test (common/tests/s3.rs), in a venv under target/.
ensure_moto() {
  [[ -x target/moto/bin/moto_server ]] && return 0
  echo "installing moto (a local S3 server for the tests) into target/moto"
  if ! python3 -m venv target/moto >/dev/null 2>&1; then
    rm -rf target/moto
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv target/moto || { echo "error: python3 with venv is needed for the S3 test: sudo apt-get install python3-venv" >&2; return 1; }
  fi
  target/moto/bin/pip install -q 'moto[server]>=5.1,<6' || { rm -rf target/moto; echo "error: could not install moto from PyPI" >&2; return 1; }
}

ensure_chromium() {
  # The console's browser tests drive headless Chromium through chromedriver (WebDriver).
  command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v google-chrome >/dev/null; } && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null && return 0
  fi
  echo "error: headless Chromium and chromedriver are needed for the console tests: sudo apt-get install chromium chromium-driver" \
    "(Debian; on Ubuntu, whose Chromium is a snap, put a chromedriver on the PATH)" >&2
  return 1
}
