#!/usr/bin/env bash
# Fuzzes the admin API with schemathesis (PyPI) against a running worker
# (`driftd quickstart --serve` in a temporary directory): no answer may be a
# 5xx, and every answer must match /openapi.json (status code, content type,
# body schema). Installs schemathesis with pip when it is missing.
#   ./scripts/api-fuzz.sh                               the short run the suite does
#   DRIFTD_API_FUZZ_EXAMPLES=200 ./scripts/api-fuzz.sh  a longer one
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
die() { echo "api fuzz: $*" >&2; exit 1; }

if ! command -v schemathesis >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check 'schemathesis>=4,<5' \
    || die "pip install schemathesis failed"
fi
command -v schemathesis >/dev/null || die "schemathesis not on PATH after install"
cargo build --locked -q
dir=$(mktemp -d)
(cd "$dir" && exec "$root/target/debug/driftd" quickstart --serve >"$dir/out.log" 2>&1) &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT

# The quickstart writes its config (with the admin address it took) first.
listen=""
for _ in $(seq 1 300); do
  if [ -f "$dir/driftd-quickstart.toml" ]; then
    listen=$(sed -n 's/^listen = "\(.*\)"$/\1/p' "$dir/driftd-quickstart.toml" | head -n1)
    if [ -n "$listen" ] && curl -sf "http://$listen/healthz" >/dev/null; then
      break
    fi
  fi
  kill -0 $pid 2>/dev/null || { cat "$dir/out.log" >&2; die "the quickstart worker stopped"; }
  sleep 0.2
done
curl -sf "http://$listen/healthz" >/dev/null || { cat "$dir/out.log" >&2; die "the worker never answered"; }

schemathesis run "http://$listen/openapi.json" --url "http://$listen" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases coverage,fuzzing --max-examples "${DRIFTD_API_FUZZ_EXAMPLES:-25}" --workers 1 \
  --seed 20261129
