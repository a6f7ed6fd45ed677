#!/usr/bin/env bash
# Benchmarks: prints figures and ratios measured in one run (no pass/fail thresholds).
#   scripts/bench.sh            every benchmark
#   scripts/bench.sh superroot  "/..." against native and sshfs (args passed on, e.g. --mib 256)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --workspace --release --bins
which=${1:-all}
[ $# -gt 0 ] && shift
case "$which" in
  superroot|all) target/release/bench-superroot "$@" ;;
  *) echo "unknown benchmark $which (known: superroot)" >&2; exit 2 ;;
esac
