#!/usr/bin/env bash
# Runs every Ferry test on this machine, installing what is missing first.
# Needs root (FUSE mounts, namespaces, ptrace). Used as is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== building (release) =="
cargo build --workspace --release --all-targets

echo "== running every test =="
# Cluster tests share one bridge and the /... mountpoint name; the harness makes
# them safe to run side by side, but two cores gain nothing from more threads.
cargo test --workspace --release --no-fail-fast -- --test-threads=2
