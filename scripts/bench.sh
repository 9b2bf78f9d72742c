#!/usr/bin/env bash
# The pass benchmark on SQLite and PostgreSQL (started here, on loopback).
# DRIFTD_BENCH_ROWS=100000 ./scripts/bench.sh for a shorter run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap stop_services EXIT
start_postgres
cargo bench --bench pass --locked
