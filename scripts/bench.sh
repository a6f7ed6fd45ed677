#!/usr/bin/env bash
# Benchmarks: prints figures and ratios measured in one run (no pass/fail thresholds).
#   scripts/bench.sh            every benchmark
#   scripts/bench.sh superroot  "/..." against native and sshfs (args passed on, e.g. --mib 256)
#   scripts/bench.sh engine     dump/restore/freeze time against RSS (args: sizes in MiB)
#   scripts/bench.sh migrate    migration freeze/total time per mode and RSS (e.g. --mib 64,1024)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --workspace --release --bins --examples
which=${1:-all}
[ $# -gt 0 ] && shift
case "$which" in
  superroot) target/release/bench-superroot "$@" ;;
  engine) target/release/examples/engine_bench "$@" ;;
  migrate) target/release/bench-migrate "$@" ;;
  all)
    target/release/bench-superroot
    target/release/examples/engine_bench
    target/release/bench-migrate
    ;;
  *) echo "unknown benchmark $which (known: superroot, engine, migrate)" >&2; exit 2 ;;
esac
