#!/usr/bin/env bash
# Builds the fuzz targets (cargo-fuzz, stable toolchain: no sanitizer, debug assertions on) and
# runs each in turn, one process, from the committed seeds in fuzz/corpus/<target>. New inputs
# go to a scratch corpus under fuzz/target/, never into the committed one. One summary line per
# target; on a crash the panic, the input's path and a non-zero exit.
#
#   fuzz/run.sh                       # 60 s per target (FUZZ_SECONDS), every target
#   FUZZ_RUNS=10000000 fuzz/run.sh    # a fixed number of executions per target instead
#   FUZZ_RUNS=10000000 FUZZ_SECONDS=1200 fuzz/run.sh   # whichever comes first
#   fuzz/run.sh mqtt_codec csv_batch  # some targets only
#
# docs/SECURITY.md ("Fuzzing") describes the targets and records the long run.
set -euo pipefail
cd "$(dirname "$0")"

runs="${FUZZ_RUNS:-}"
seconds="${FUZZ_SECONDS:-}"
if [ -z "$runs" ] && [ -z "$seconds" ]; then seconds=60; fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(mqtt_codec mqtt_handshake link_payloads link_credentials csv_batch import_package)
fi

export CARGO_INCREMENTAL=0
mkdir -p target
build_log=target/build.log
# All targets at once: they share every dependency.
if ! cargo fuzz build --sanitizer none --debug-assertions >"$build_log" 2>&1; then
  tail -40 "$build_log"
  exit 1
fi
grep -E "^ *Finished" "$build_log" || true
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release"

failed=0
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || { echo "$t: not built"; failed=1; continue; }
  scratch="target/scratch-corpus/$t"
  artifacts="target/artifacts/$t"
  mkdir -p "$scratch" "$artifacts"
  log="target/$t.log"
  limit=()
  [ -n "$runs" ] && limit+=(-runs="$runs")
  [ -n "$seconds" ] && limit+=(-max_total_time="$seconds")
  start=$(date +%s)
  if "$bin/$t" "${limit[@]}" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$artifacts/" "$scratch" "corpus/$t" >"$log" 2>&1; then
    status="0 crashes"
  else
    status="FAILED"
    failed=1
  fi
  secs=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
  echo "$t: ${execs:-?} execs in ${secs} s (${rate:-?} exec/s), ${cov:-no coverage line}, $status"
  if [ "$status" = FAILED ]; then
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to" -A2 "$log" | head -20
    echo "full log: fuzz/$log; reproduce: cargo fuzz run --sanitizer none $t <input>"
  fi
done
exit "$failed"
