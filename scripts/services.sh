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

STOP_ACTIONS=()
stop_services() {
  local a
  for a in "${STOP_ACTIONS[@]}"; do eval "$a" || true; done
}
