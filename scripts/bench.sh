#!/usr/bin/env bash
# The benchmarks, with the servers they need started here on loopback.
#   ./scripts/bench.sh          the pass benchmark, SQLite and PostgreSQL
#   ./scripts/bench.sh scale    the pass at 100k, 1M and 10M rows, with and
#                               without the key order promise (10M needs
#                               about 10 GB of disk and 15 minutes)
#   ./scripts/bench.sh events   events from RabbitMQ into PostgreSQL, against
#                               an ack-only consumer of the same queue
#   ./scripts/bench.sh streams  entries from a Redis stream into PostgreSQL,
#                               against an ack-only XREADGROUP consumer
# DRIFTD_BENCH_ROWS=100000 (pass) or DRIFTD_BENCH_EVENTS=20000 (events)
# for a shorter run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap stop_services EXIT
start_postgres
ensure_floor_tools
case "${1:-pass}" in
  pass) cargo bench --bench pass --locked ;;
  scale)
    DRIFTD_BENCH_ROWS="${DRIFTD_BENCH_ROWS:-100000,1000000,10000000}" \
      DRIFTD_BENCH_UNORDERED=1 cargo bench --bench pass --locked
    ;;
  events)
    start_rabbitmq
    cargo bench --bench events --locked
    ;;
  streams)
    start_redis
    cargo bench --bench streams --locked
    ;;
  *) die "unknown benchmark ${1}: pass, scale, events or streams" ;;
esac
