# Real servers for the test suite, on loopback, from Debian's packages.
# Sourced by scripts/test.sh. Each start_* function installs what is
# missing, starts a private instance under $DRIFTD_TEST_ROOT, waits until it
# answers, and exports the URL the tests read. A server that cannot start
# ends the script with an error: the suite never silently skips.

DRIFTD_TEST_ROOT=${DRIFTD_TEST_ROOT:-/tmp/driftd-test}
APT_UPDATED=${APT_UPDATED:-0}

die() { echo "test setup: $*" >&2; exit 1; }

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
  if [ "$APT_UPDATED" = 0 ]; then
    apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# Runs a command as the postgres user when we are root (initdb refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

start_postgres() {
  local bin port data
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    apt_install postgresql
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [ -x "$bin/initdb" ] || die "PostgreSQL binaries not found after install"
  port=${DRIFTD_TEST_PG_PORT:-55432}
  data=$DRIFTD_TEST_ROOT/pg
  if [ -f "$data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl -D $data -m immediate stop" >/dev/null 2>&1 || true
  fi
  rm -rf "$data"
  mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown -R postgres "$DRIFTD_TEST_ROOT"
  as_pg "$bin/initdb -D $data -U postgres --auth=trust -E UTF8 --no-sync" >"$DRIFTD_TEST_ROOT/pg-initdb.log" 2>&1 \
    || { cat "$DRIFTD_TEST_ROOT/pg-initdb.log" >&2; die "initdb failed"; }
  as_pg "$bin/pg_ctl -D $data -l $data/server.log -w -t 60 \
    -o '-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300'" start >/dev/null \
    || { cat "$data/server.log" >&2; die "PostgreSQL did not start on 127.0.0.1:$port"; }
  STOP_ACTIONS+=("as_pg '$bin/pg_ctl -D $data -m fast stop' >/dev/null 2>&1")
  export DRIFTD_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

# Prometheus and promtool for the dashboard and alert-rule tests. Nothing is
# started here: each test spawns its own Prometheus on a free loopback port
# with a generated config (never the packaged service's :9090).
ensure_prometheus() {
  local prom=/usr/bin/prometheus tool=/usr/bin/promtool
  if [ ! -x "$prom" ] || [ ! -x "$tool" ]; then
    apt_install prometheus
  fi
  [ -x "$prom" ] || die "prometheus not found at $prom after install"
  [ -x "$tool" ] || die "promtool not found at $tool after install"
  export DRIFTD_TEST_PROMETHEUS=$prom
  export DRIFTD_TEST_PROMTOOL=$tool
  echo "Prometheus $("$prom" --version 2>&1 | awk 'NR == 1 {print $3}') at $prom"
}

# RabbitMQ for the event-source tests: a private node (its own name, ports,
# data, logs and Erlang cookie under $DRIFTD_TEST_ROOT/rabbitmq), AMQP on
# 127.0.0.1:$DRIFTD_TEST_AMQP_PORT. Exports DRIFTD_TEST_AMQP_URL, and
# DRIFTD_TEST_RABBITMQ_CTL: a script taking `stop_app` or `start_app`, with
# which tests take the broker away and bring it back.
start_rabbitmq() {
  local lib=/usr/lib/rabbitmq/bin port dir node ctl i
  if [ ! -x "$lib/rabbitmq-server" ]; then
    apt_install rabbitmq-server
  fi
  [ -x "$lib/rabbitmq-server" ] || die "RabbitMQ not found at $lib after install"
  # A packaged node apt may have started is left alone: ours has its own
  # name and ports.
  port=${DRIFTD_TEST_AMQP_PORT:-55672}
  dir=$DRIFTD_TEST_ROOT/rabbitmq
  node="driftd-test-$port@localhost"
  ctl=$dir/ctl
  if [ -x "$ctl" ]; then
    "$ctl" stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  mkdir -p "$dir/home" "$dir/log" "$dir/mnesia"
  echo "driftd-test-cookie-$port" >"$dir/home/.erlang.cookie"
  chmod 400 "$dir/home/.erlang.cookie"
  echo "[]." >"$dir/enabled_plugins"
  printf 'loopback_users = none\nlisteners.tcp.default = 127.0.0.1:%s\n' "$port" >"$dir/rabbitmq.conf"
  cat >"$dir/env" <<ENV
export HOME='$dir/home'
export RABBITMQ_NODENAME='$node'
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$((port + 100))
export RABBITMQ_MNESIA_BASE='$dir/mnesia'
export RABBITMQ_LOG_BASE='$dir/log'
export RABBITMQ_CONFIG_FILE='$dir/rabbitmq.conf'
export RABBITMQ_ENABLED_PLUGINS_FILE='$dir/enabled_plugins'
export RABBITMQ_PID_FILE='$dir/pid'
ENV
  cat >"$ctl" <<CTL
#!/bin/sh
# Controls the test suite's RabbitMQ node: stop_app, start_app, stop.
. '$dir/env'
exec '$lib/rabbitmqctl' -n '$node' -q "\$@"
CTL
  chmod +x "$ctl"
  (. "$dir/env"; exec "$lib/rabbitmq-server" >"$dir/server.log" 2>&1) &
  for i in $(seq 1 90); do
    if "$ctl" await_startup >/dev/null 2>&1; then
      break
    fi
    sleep 1
  done
  "$ctl" await_startup >/dev/null 2>&1 \
    || { cat "$dir/server.log" "$dir"/log/*.log >&2 2>/dev/null; die "RabbitMQ did not start on 127.0.0.1:$port"; }
  STOP_ACTIONS+=("'$ctl' stop >/dev/null 2>&1")
  export DRIFTD_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2f"
  export DRIFTD_TEST_RABBITMQ_CTL="$ctl"
  echo "RabbitMQ $("$ctl" version 2>/dev/null) on 127.0.0.1:$port"
}

STOP_ACTIONS=()
stop_services() {
  local a
  for a in "${STOP_ACTIONS[@]}"; do eval "$a" || true; done
}
