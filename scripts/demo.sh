#!/usr/bin/env bash
# The main job: starts a three-node local Ferry cluster (network namespaces on this
# machine), shows the "/..." super-root working across nodes, then stops the cluster.
# Needs root. Keep the cluster running with KEEP=1 and stop it later with
#   target/release/cluster down --dir /tmp/ferry-demo
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== building (release) =="
cargo build --workspace --release --bins

dir=${DIR:-/tmp/ferry-demo}
cluster=target/release/cluster
"$cluster" down --dir "$dir" >/dev/null 2>&1 || true
if [ "${KEEP:-0}" != 1 ]; then
  trap '"$cluster" down --dir "$dir"' EXIT
fi

run() { echo "\$ $*"; "$@"; }
echo "== starting 3 nodes in $dir =="
run "$cluster" up --nodes 3 --dir "$dir"

echo "== every node sees every volume under /... =="
run "$cluster" exec --dir "$dir" ws2 -- ls /...
echo "== ws1 writes into its private /tmp; ws2 and ws3 read it through /.../ws1/tmp =="
run "$cluster" exec --dir "$dir" ws1 -- sh -c 'hostname; echo "hello from $(hostname)" > /tmp/greeting'
run "$cluster" exec --dir "$dir" ws2 -- sh -c 'hostname; cat /.../ws1/tmp/greeting'
run "$cluster" exec --dir "$dir" ws3 -- sh -c 'hostname; cat /.../ws1/tmp/greeting'
echo "== the shared store, written from ws3, read from ws2 =="
run "$cluster" exec --dir "$dir" ws3 -- sh -c 'seq 1 100000 > /.../store/numbers && sha256sum /.../store/numbers'
run "$cluster" exec --dir "$dir" ws2 -- sha256sum /.../store/numbers
echo "== demo done =="
