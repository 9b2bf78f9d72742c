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

# True when something listens on TCP port $1 (any address).
listening() {
  if command -v ss >/dev/null; then
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# The command-line tools the pass benchmark measures its floor with (its
# smoke run is part of the suite): curl, and sqlite3 (psql comes with
# PostgreSQL).
ensure_floor_tools() {
  local missing=()
  command -v curl >/dev/null || missing+=(curl)
  command -v sqlite3 >/dev/null || missing+=(sqlite3)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
  command -v curl >/dev/null && command -v sqlite3 >/dev/null \
    || die "curl and sqlite3 not found after install"
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

# RabbitMQ for the event-source tests, from Debian's rabbitmq-server: a
# private node driftd-test-$port@localhost under $DRIFTD_TEST_ROOT/rabbitmq
# (its own data, logs, config and random Erlang cookie), AMQP on
# 127.0.0.1:$DRIFTD_TEST_AMQP_PORT, its own epmd and distribution ports (on
# loopback, derived from the AMQP port below), so it meets neither a packaged
# node (5672, 25672, epmd 4369) nor a concurrent test run on another AMQP
# port. Exports DRIFTD_TEST_AMQP_URL, and DRIFTD_TEST_RABBITMQ_CTL: a script
# taking `stop_app`, `start_app` or `restart` (both), with which tests take
# the broker away and bring it back (durable queues and persistent messages
# survive), `stop`, which ends the node and its epmd, or any other rabbitmqctl
# command.
start_rabbitmq() {
  local lib=/usr/lib/rabbitmq/bin f port epmd_port dist_port dir node ctl pid deadline
  if [ ! -x "$lib/rabbitmq-server" ] || [ ! -x "$lib/rabbitmqctl" ]; then
    apt_install rabbitmq-server
    # Where apt may start services (not under a policy-rc.d that forbids it,
    # as in most containers) it has just started the packaged node on 5672:
    # stop it, the tests use only their own.
    if command -v invoke-rc.d >/dev/null; then
      invoke-rc.d rabbitmq-server stop >/dev/null 2>&1 || true
    fi
  fi
  for f in rabbitmq-server rabbitmqctl; do
    [ -x "$lib/$f" ] || die "$lib/$f not found after installing RabbitMQ"
  done
  command -v epmd >/dev/null || die "epmd not found (erlang-base) after installing RabbitMQ"
  port=${DRIFTD_TEST_AMQP_PORT:-55672}
  # Its epmd and distribution ports, from the AMQP port: 30672 and 29172 for
  # 55672. Two AMQP ports get four distinct ones unless they are 1500 apart
  # (or one is under 30000 and the other about 55000 above it); a port taken
  # by anything else is caught below. The CLI's distribution port is any free
  # one (0).
  if [ "$port" -ge 30000 ]; then
    epmd_port=$((port - 25000)) dist_port=$((port - 26500))
  else
    epmd_port=$((port + 30000)) dist_port=$((port + 28500))
  fi
  dir=$DRIFTD_TEST_ROOT/rabbitmq
  node=driftd-test-$port@localhost
  ctl=$dir/ctl
  # A previous run's node under this root: its own ctl knows its cookie and epmd.
  if [ -x "$ctl" ]; then
    "$ctl" stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  ! listening "$port" || die "127.0.0.1:$port is taken (another test run?): set DRIFTD_TEST_AMQP_PORT"
  if listening "$epmd_port" && ! ERL_EPMD_PORT=$epmd_port epmd -names >/dev/null 2>&1; then
    die "port $epmd_port, for the epmd of AMQP port $port, is taken: set DRIFTD_TEST_AMQP_PORT"
  fi
  ! listening "$dist_port" || die "port $dist_port, for the Erlang distribution of AMQP port $port, is taken: set DRIFTD_TEST_AMQP_PORT"
  mkdir -p "$dir/home" "$dir/log" "$dir/mnesia"
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$dir/home/.erlang.cookie"
  chmod 400 "$dir/home/.erlang.cookie"
  echo "[]." >"$dir/enabled_plugins"
  : >"$dir/rabbitmq-env.conf"
  printf 'listeners.tcp.default = 127.0.0.1:%s\n' "$port" >"$dir/rabbitmq.conf"
  cat >"$dir/env" <<ENV
export HOME='$dir/home'
export RABBITMQ_NODENAME='$node'
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$dist_port
export RABBITMQ_CTL_DIST_PORT_MIN=0
export RABBITMQ_CTL_DIST_PORT_MAX=0
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
export RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
export ERL_EPMD_PORT=$epmd_port
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_MNESIA_BASE='$dir/mnesia'
export RABBITMQ_LOG_BASE='$dir/log'
export RABBITMQ_CONFIG_FILE='$dir/rabbitmq.conf'
export RABBITMQ_ADVANCED_CONFIG_FILE='$dir/advanced.config'
export RABBITMQ_CONF_ENV_FILE='$dir/rabbitmq-env.conf'
export RABBITMQ_ENABLED_PLUGINS_FILE='$dir/enabled_plugins'
export RABBITMQ_PID_FILE='$dir/pid'
ENV
  cat >"$ctl" <<CTL
#!/bin/sh
# The test suite's RabbitMQ node $node: stop_app, start_app, restart
# (stop_app then start_app), stop (the node and its epmd), or any rabbitmqctl
# command.
. '$dir/env'
rmqctl() { '$lib/rabbitmqctl' -n '$node' -q "\$@"; }
case "\$1" in
  restart) rmqctl stop_app && rmqctl start_app ;;
  stop)
    rmqctl shutdown >/dev/null 2>&1
    pid=\$(cat '$dir/pid' 2>/dev/null)
    if [ -n "\$pid" ] && tr '\\0' '\\n' <"/proc/\$pid/environ" 2>/dev/null | grep -qxF 'HOME=$dir/home'; then
      kill -TERM "\$pid" 2>/dev/null
      i=0; while kill -0 "\$pid" 2>/dev/null && [ \$i -lt 20 ]; do sleep 0.5; i=\$((i + 1)); done
      kill -KILL "\$pid" 2>/dev/null
    fi
    epmd -kill >/dev/null 2>&1
    true ;;
  *) rmqctl "\$@" ;;
esac
CTL
  chmod +x "$ctl"
  (cd "$dir" && . ./env && exec "$lib/rabbitmq-server" >server.log 2>&1) &
  pid=$!
  STOP_ACTIONS+=("'$ctl' stop")
  deadline=$((SECONDS + 90))
  # The AMQP listener opens at the end of the boot; each rabbitmqctl costs
  # a second of Erlang VM start, so it is asked only then.
  until listening "$port" && "$ctl" -t 10 await_startup >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      cat "$dir/server.log" "$dir"/log/*.log >&2 2>/dev/null
      die "RabbitMQ did not start on 127.0.0.1:$port"
    fi
    sleep 0.5
  done
  export DRIFTD_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2f"
  export DRIFTD_TEST_RABBITMQ_CTL="$ctl"
  echo "RabbitMQ $("$ctl" version 2>/dev/null) on 127.0.0.1:$port"
}

start_redis() {
  local bin=/usr/bin/redis-server port dir pid deadline
  if [ ! -x "$bin" ]; then
    apt_install redis-server
    # apt may have started the packaged server on 6379: the tests use only
    # their own.
    if command -v invoke-rc.d >/dev/null; then
      invoke-rc.d redis-server stop >/dev/null 2>&1 || true
    fi
  fi
  [ -x "$bin" ] || die "redis-server not found after installing it"
  port=${DRIFTD_TEST_REDIS_PORT:-56379}
  dir=$DRIFTD_TEST_ROOT/redis
  if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    sleep 0.5
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  ! listening "$port" || die "127.0.0.1:$port is taken (another test run?): set DRIFTD_TEST_REDIS_PORT"
  # In memory only: nothing is saved, nothing read back on start.
  "$bin" --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --appendonly no \
    --daemonize no --logfile "$dir/server.log" --pidfile "$dir/pid" &
  pid=$!
  STOP_ACTIONS+=("kill $pid 2>/dev/null")
  deadline=$((SECONDS + 30))
  until listening "$port"; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      cat "$dir/server.log" >&2 2>/dev/null
      die "Redis did not start on 127.0.0.1:$port"
    fi
    sleep 0.2
  done
  export DRIFTD_TEST_REDIS_URL="redis://127.0.0.1:$port/"
  echo "Redis $("$bin" --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$port"
}

STOP_ACTIONS=()
stop_services() {
  local a
  for a in "${STOP_ACTIONS[@]}"; do eval "$a" || true; done
}
