#!/usr/bin/env bash
# The benchmarks, with the servers they need started here on loopback.
#   ./scripts/bench.sh          the pass benchmark, SQLite and PostgreSQL
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
  events)
    start_rabbitmq
    cargo bench --bench events --locked
    ;;
  streams)
    start_redis
    cargo bench --bench streams --locked
    ;;
  *) die "unknown benchmark ${1}: pass, events or streams" ;;
esac
