#!/usr/bin/env bash
# Runs driftd's whole test suite: installs (apt) and starts the servers the
# tests need on loopback, then lint, unit and integration tests, and the
# admin API fuzzed against its OpenAPI document.
# With arguments, runs only `cargo test ARGS` (servers still started).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap stop_services EXIT

start_postgres
ensure_floor_tools
start_rabbitmq
start_redis
ensure_prometheus

if [ $# -gt 0 ]; then
  # A developer's narrower run: ./scripts/test.sh --test integration guards
  cargo test "$@"
  exit
fi
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
# The admin API against its own OpenAPI document (schemathesis, from PyPI).
scripts/api-fuzz.sh
