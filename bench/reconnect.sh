#!/usr/bin/env bash
# Reconnect cycles (docs/BENCHMARKS.md, "reconnects do not leak"): one release gateway, N
# firmware-sim devices (each subscribes to its OTA topic) that connect, stay 6 s and disconnect,
# CYCLES times. Prints the gateway's RSS and its jemalloc heap gauges
# (`fleetgate_allocator_bytes{kind}`) after each cycle, and once more 25 s after the last.
#
# Usage: bench/reconnect.sh [DEVICES=5000] [CYCLES=10]
# Environment: CARGO_TARGET_DIR (default ./target), RECONNECT_DIR (default
# /tmp/fleetgate-reconnect), RECONNECT_MQTT_PORT (default 1897), RECONNECT_HTTP_PORT (default 8097).
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-5000}"
cycles="${2:-10}"
dir="${RECONNECT_DIR:-/tmp/fleetgate-reconnect}"
mqtt="127.0.0.1:${RECONNECT_MQTT_PORT:-1897}"
http="127.0.0.1:${RECONNECT_HTTP_PORT:-8097}"
token="reconnect-admin-token-0123456789"
. bench/gateway.sh
build_release
start_gateway "$dir" "$mqtt" "$http" "$token"
memory() {
    local heap
    heap=$(curl -sf "http://$http/metrics" | grep '^fleetgate_allocator_bytes' |
        sed -E 's/fleetgate_allocator_bytes\{kind="([a-z]+)"\} ([0-9]+)/\1 \2/' |
        awk '{printf "%s %.1f MiB, ", $1, $2 / 1048576}')
    echo "RSS $(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$gw/status"); heap: $heap"
}
online() { curl -sf "http://$http/healthz" | grep -o '"online_devices":[0-9]*'; }
pk=$(curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"name":"reconnect"}' "http://$http/api/v1/products" |
    sed -E 's/.*"product_key":"([^"]+)".*/\1/')
echo "idle: $(memory)"
sim=("$target/release/firmware-sim" --product "$pk" --api "http://$http" --mqtt "$mqtt"
    --telemetry-interval 0 --quiet --connect-rate 5000 --duration 6)
FLEETGATE_API_TOKEN="$token" "${sim[@]}" --provision "$devices" \
    --save-devices "$dir/devices.csv" > /dev/null
sleep 2
echo "cycle 1, after disconnect: $(memory)"
for c in $(seq 2 "$cycles"); do
    "${sim[@]}" --devices "$dir/devices.csv" > /dev/null &
    s=$!
    sleep 5
    echo "cycle $c, connected ($(online)): $(memory)"
    wait $s || echo "firmware-sim exited with $?"
    sleep 2
    echo "cycle $c, after disconnect: $(memory)"
done
sleep 25
echo "25 s later: $(memory)"
