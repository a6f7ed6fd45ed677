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
echo "== a running python3 program moves ws1 -> ws2 -> ws3 -> home; its output stays in ws1's /tmp =="
cp tests/programs/count.py "$dir/count.py"   # N lines, each a function of its index
in_node() { node=$1; shift; "$cluster" exec --dir "$dir" "$node" -- "$@"; }
pid=$(in_node ws1 sh -c "python3 $dir/count.py /tmp/count 80 0.1 </dev/null >/dev/null 2>/tmp/count.err & echo \$!")
echo "started python3 on ws1 as pid $pid"
sleep 1
run "$cluster" exec --dir "$dir" ws1 -- migrate "$pid" ws2
run "$cluster" exec --dir "$dir" ws2 -- migrate --list
sleep 1
run "$cluster" exec --dir "$dir" ws1 -- migrate "$pid" ws3
run "$cluster" exec --dir "$dir" ws1 -- migrate --list
sleep 1
run "$cluster" exec --dir "$dir" ws1 -- migrate "$pid" home
run "$cluster" exec --dir "$dir" ws1 -- ps -o pid,stat,comm -p "$pid"
for _ in $(seq 1 300); do
  in_node ws1 kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
in_node ws1 python3 "$dir/count.py" /tmp/reference 80 0 || [ $? = 4 ]   # count.py exits 4
if in_node ws1 cmp /tmp/count /tmp/reference; then
  echo "ws1:/tmp/count ($(in_node ws1 wc -l /tmp/count | cut -d" " -f1) lines) is identical to an unmigrated run"
else
  echo "ws1:/tmp/count differs from an unmigrated run" >&2
  exit 1
fi
echo "== demo done =="
