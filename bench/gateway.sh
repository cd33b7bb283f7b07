# Sourced by bench/soak.sh and bench/reconnect.sh: builds the release gateway and simulator,
# raises the open-files limit, and starts one gateway.
#
# start_gateway DIR MQTT_ADDR HTTP_ADDR TOKEN: fresh DIR, the gateway's stderr in
# DIR/gateway.log, its pid in $gw (killed when the script exits); returns once /healthz answers.
target="${CARGO_TARGET_DIR:-target}"

build_release() {
    cargo build --release -p fleetgate -p firmware-sim
    ulimit -n "$(ulimit -Hn)" || true
}

start_gateway() {
    local dir=$1 mqtt=$2 http=$3 token=$4
    rm -rf "$dir" && mkdir -p "$dir"
    # Every simulated device runs on this host, one source address: the per-address caps
    # and the pre-CONNECT pressure timeout (docs/SECURITY.md) would throttle them.
    "$target/release/fleetgate" serve --mqtt-listen "$mqtt" --http-listen "$http" \
        --data-dir "$dir/data" --api-token "$token" \
        --mqtt-max-unauthenticated-per-ip 1000000 --mqtt-pressure-unauthenticated 1000000 \
        --http-max-connections-per-ip 1024 2> "$dir/gateway.log" &
    gw=$!
    trap 'kill $gw 2>/dev/null || true' EXIT
    for _ in $(seq 1 100); do
        curl -sf "http://$http/healthz" > /dev/null && return
        sleep 0.1
    done
    echo "the gateway did not answer on http://$http/healthz; see $dir/gateway.log" >&2
    return 1
}
