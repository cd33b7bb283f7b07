#!/usr/bin/env bash
# Reproduces docs/BENCHMARKS.md: builds the release binaries, copies them aside (a shared target
# dir may be rebuilt by someone else mid-run), raises the open-files limit, widens the ephemeral
# port range for the duration of the run if allowed (restored on exit), and runs every part.
# Extra arguments go to fleetgate-bench (see `fleetgate-bench --help`), e.g. `--runs 1`;
# `--parts ota` / `--parts migration` run the OTA campaign and migration benchmarks (with
# firmware-sim), see docs/BENCHMARKS.md.
#
# Environment: CARGO_TARGET_DIR (default ./target), BENCH_WIDEN_PORTS=0 to leave the port
# range alone, BENCH_OUT (default bench-results.json).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p fleetgate -p fleetgate-bench -p firmware-sim
bin="$(mktemp -d /tmp/fleetgate-bench-bin.XXXXXX)"
cp "$target/release/fleetgate" "$target/release/fleetgate-bench" "$target/release/stock-rumqttd" \
    "$target/release/firmware-sim" "$bin/"

# Broker and load generator each hold one descriptor per connection.
ulimit -n "$(ulimit -Hn)" || true
echo "open files: $(ulimit -n)"

# 20,000 client sockets from one address fill the default 28k-port range (32768-60999): the
# kernel's ephemeral port search (__inet_hash_connect) then dominates the load generator's CPU.
range=/proc/sys/net/ipv4/ip_local_port_range
cleanup() { rm -rf "$bin"; }
if [ "${BENCH_WIDEN_PORTS:-1}" = 1 ] && [ -w "$range" ]; then
    orig="$(tr -s ' \t' ' ' < "$range")"
    if echo "10000 65535" > "$range" 2>/dev/null; then
        cleanup() { echo "$orig" > "$range"; rm -rf "$bin"; }
        echo "ephemeral ports: 10000-65535 for this run (was $orig)"
    fi
fi
trap cleanup EXIT

extra=()
if command -v mosquitto >/dev/null 2>&1; then
    extra+=(--mosquitto "$(command -v mosquitto)")
elif [ -x /usr/sbin/mosquitto ]; then
    extra+=(--mosquitto /usr/sbin/mosquitto)
fi
# The gateway binary links jemalloc itself (default `jemalloc` feature); `--jemalloc <lib>` (an
# LD_PRELOAD row) is only meaningful for a `--no-default-features` build passed as --fleetgate-bin.

"$bin/fleetgate-bench" --json-out "${BENCH_OUT:-bench-results.json}" "${extra[@]}" "$@"
