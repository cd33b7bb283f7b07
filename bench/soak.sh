#!/usr/bin/env bash
# The fleet soak of docs/BENCHMARKS.md ("Fleet simulator against the gateway", issue 3): one
# release gateway and one firmware-sim process on 127.0.0.1, N devices provisioned through the
# API, one property post per device per second with reply checking, for DURATION seconds.
# Prints the simulator's JSON summary (soak-sim.json), the gateway's RSS (idle, after connect,
# at the end) and its message/reply counters.
#
# Usage: bench/soak.sh [DEVICES=10000] [DURATION=90]
# Environment: CARGO_TARGET_DIR (default ./target), SOAK_DIR (default /tmp/fleetgate-soak),
# SOAK_MQTT_PORT (default 1896), SOAK_HTTP_PORT (default 8096).
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-10000}"
duration="${2:-90}"
dir="${SOAK_DIR:-/tmp/fleetgate-soak}"
mqtt_port="${SOAK_MQTT_PORT:-1896}"
http_port="${SOAK_HTTP_PORT:-8096}"
token="soak-admin-token-0123456789"
api="http://127.0.0.1:$http_port/api/v1"
. bench/gateway.sh
build_release
start_gateway "$dir" "127.0.0.1:$mqtt_port" "127.0.0.1:$http_port" "$token"
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$gw/status"; }
pk=$(curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"name":"soak"}' "$api/products" | sed -E 's/.*"product_key":"([^"]+)".*/\1/')
echo "gateway pid $gw, product $pk, RSS idle $(rss)"

FLEETGATE_API_TOKEN="$token" "$target/release/firmware-sim" \
    --scenario firmware-sim/scenarios/soak.toml --provision "$devices" --product "$pk" \
    --api "http://127.0.0.1:$http_port" --mqtt "127.0.0.1:$mqtt_port" --duration "$duration" \
    --quiet --json > "$dir/soak-sim.json" &
sim=$!
peak=0
while kill -0 $sim 2>/dev/null; do
    kib=$(awk '/VmRSS/ {print $2}' "/proc/$gw/status")
    [ "$kib" -gt "$peak" ] && peak=$kib
    sleep 1
done
wait $sim || echo "firmware-sim exited with $?"
echo "gateway RSS at the end $(rss), peak $((peak / 1024)) MiB, threads $(ls /proc/$gw/task | wc -l)"
curl -sf "http://127.0.0.1:$http_port/metrics" \
    | grep -E '^fleetgate_mqtt_(messages_total\{kind="property_post"\}|downlink)' || true
echo "simulator summary: $dir/soak-sim.json"
python3 - "$dir/soak-sim.json" <<'PY' || true
import json, sys
s = json.load(open(sys.argv[1]))
for part in ("connect", "telemetry", "memory"):
    print(f"  {part}: {json.dumps(s[part])}")
PY
