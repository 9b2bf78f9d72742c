#!/usr/bin/env bash
# The benchmarks, with the servers they need started here on loopback.
#   ./scripts/bench.sh          the pass benchmark, SQLite and PostgreSQL
#   ./scripts/bench.sh events   events from RabbitMQ into PostgreSQL, against
#                               an ack-only consumer of the same queue
# DRIFTD_BENCH_ROWS=100000 (pass) or DRIFTD_BENCH_EVENTS=20000 (events)
# for a shorter run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap stop_services EXIT
start_postgres
case "${1:-pass}" in
  pass) cargo bench --bench pass --locked ;;
  events)
    start_rabbitmq
    cargo bench --bench events --locked
    ;;
  *) die "unknown benchmark ${1}: pass or events" ;;
esac
