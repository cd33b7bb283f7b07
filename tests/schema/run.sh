#!/usr/bin/env bash
# Schema testing of the operator API: schemathesis against a live gateway's own
# /api/v1/openapi.json. The gateway runs from the debug build on ephemeral ports with a fresh
# data directory and an admin token; schemathesis generates valid and invalid requests for every
# documented operation (fixed seed, bounded examples) and fails on a 5xx, a status code or
# content type the document does not list, or a body that does not match its schema.
#
#   tests/schema/run.sh                      # the CI run (SCHEMA_MAX_EXAMPLES=100, seed 14)
#   SCHEMA_MAX_EXAMPLES=500 tests/schema/run.sh
#   SCHEMA_ARGS="--include-path-regex /devices" tests/schema/run.sh
#
# The venv is tests/schema/.venv (pinned in requirements.txt); reports (JUnit, and the NDJSON
# event log with every request) go to tests/schema/report/. docs/SECURITY.md, "Schema testing".
set -euo pipefail
cd "$(dirname "$0")/../.."

examples="${SCHEMA_MAX_EXAMPLES:-100}"
seed="${SCHEMA_SEED:-14}"
venv=tests/schema/.venv
report=tests/schema/report

if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/schema/requirements.txt

export CARGO_INCREMENTAL=0
cargo build --quiet --bin fleetgate
bin="${FLEETGATE_BIN:-target/debug/fleetgate}"

work=$(mktemp -d)
token="fg_schema_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
"$bin" serve --data-dir "$work/data" --api-token "$token" \
  --http-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 >"$work/stdout" 2>"$work/gateway.log" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

addr=""
for _ in $(seq 1 100); do
  addr=$(grep -m1 -oE ' http=[0-9.]+:[0-9]+' "$work/gateway.log" | cut -d= -f2 || true)
  [ -n "$addr" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/gateway.log"; echo "the gateway did not start"; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/gateway.log"; echo "no HTTP address in the gateway's log"; exit 1; }
base="http://$addr"
echo "gateway on $base (pid $pid)"

# Something to find: a product with a device, so the operations on existing resources answer
# 200 with a body (checked against its schema) and not only 404.
api() {
  curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' "$@"
}
pk=$(api -X POST "$base/api/v1/products" -d '{"name":"schema"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["product_key"])')
api -X POST "$base/api/v1/products/$pk/devices" -d '{"device_name":"schema-dev"}' >/dev/null

rm -rf "$report"
status=0
# shellcheck disable=SC2086
timeout "${SCHEMA_TIMEOUT:-220}" "$venv/bin/schemathesis" run "$base/api/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,unsupported_method \
  --phases examples,coverage,fuzzing \
  --max-examples "$examples" --seed "$seed" --workers 2 \
  --request-timeout 10 --generation-database none --no-color \
  --report junit,ndjson --report-dir "$report" \
  ${SCHEMA_ARGS:-} || status=$?

# Requests sent and statuses received, from the event log.
python3 - "$report"/*.ndjson <<'PY' || true
import collections, json, sys
statuses = collections.Counter()
def walk(o):
    if isinstance(o, dict):
        r = o.get("response")
        if isinstance(r, dict) and "status_code" in r:
            statuses[r["status_code"]] += 1
        for v in o.values():
            walk(v)
    elif isinstance(o, list):
        for v in o:
            walk(v)
for line in open(sys.argv[1]):
    walk(json.loads(line))
print(f"{sum(statuses.values())} requests; statuses:", dict(sorted(statuses.items())))
PY
echo "schemathesis exit status $status; reports in $report/"
if grep -qE "panicked|ERROR" "$work/gateway.log"; then
  echo "the gateway logged errors:"; grep -E "panicked|ERROR" "$work/gateway.log" | head -20
  status=1
fi
exit "$status"
