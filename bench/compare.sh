#!/usr/bin/env bash
# Benchmarks kvraft against etcd 3.4 (Debian's etcd-server) on this machine,
# the same way: three members on loopback, the same load generator semantics
# (`kvraft bench` and bench/etcd-baseline mirror each other), back to back.
# Prints each run's JSON and a table of kvraft/etcd ratios.
#
# usage: bench/compare.sh [TOTAL]        (default 30000 requests per run)
# Installs etcd-server and protobuf-compiler (etcd-client's build needs protoc)
# with apt-get if missing. Takes a few minutes; not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-30000}
WORK=$(mktemp -d)
trap 'pkill -f "kvraftd --id [123] --data-dir $WORK" || true; bash bench/etcd-cluster.sh stop "$WORK/etcd" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --bin kvraftd --bin kvraft
(cd bench/etcd-baseline && cargo build --release --locked)

LOAD="--key-size 16 --val-size 256 --key-space 10000"
RUNS=(
  "put --clients 128 --conns 16 --total $TOTAL"
  "get --clients 128 --conns 16 --total $TOTAL"
  "get --clients 128 --conns 16 --total $TOTAL --serializable"
  "put --clients 1 --conns 1 --total $((TOTAL / 10))"
)

echo "== kvraft: 3 members on 127.0.0.1"
B=target/release
CLUSTER=1=127.0.0.1:17380,2=127.0.0.1:17382,3=127.0.0.1:17384
for i in 1 2 3; do
  "$B/kvraftd" --id $i --data-dir "$WORK/kv$i" --client-addr 127.0.0.1:$((17377 + 2 * i)) \
    --peer-addr 127.0.0.1:$((17378 + 2 * i)) --metrics-addr "" --initial-cluster $CLUSTER \
    --log-filter warn 2>"$WORK/kv$i.log" &
done
E=127.0.0.1:17379,127.0.0.1:17381,127.0.0.1:17383
for _ in $(seq 50); do "$B/kvraft" --endpoints $E --timeout 1s set warm up >/dev/null 2>&1 && break; sleep 0.2; done
: >"$WORK/kvraft.json"
for run in "${RUNS[@]}"; do
  set -- $run
  op=$1; shift
  serializable=""
  [[ " $* " == *" --serializable "* ]] && serializable="--serializable"
  args=$(echo "$*" | sed 's/--serializable//')
  # shellcheck disable=SC2086
  "$B/kvraft" --endpoints $E --output json --timeout 10s $serializable bench $op $LOAD $args 2>/dev/null | tee -a "$WORK/kvraft.json"
done
pkill -f "kvraftd --id [123] --data-dir $WORK" || true

echo "== etcd $(etcd --version | head -1 | awk '{print $3}'): 3 members on 127.0.0.1"
bash bench/etcd-cluster.sh start "$WORK/etcd" >/dev/null
EB=bench/etcd-baseline/target/release/etcd-baseline
: >"$WORK/etcd.json"
for run in "${RUNS[@]}"; do
  # shellcheck disable=SC2086
  "$EB" --endpoints 127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793 --output json $run $LOAD 2>/dev/null | tee -a "$WORK/etcd.json"
done
bash bench/etcd-cluster.sh stop "$WORK/etcd" >/dev/null

python3 - "$WORK/kvraft.json" "$WORK/etcd.json" <<'PY'
import json, sys
kv = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
et = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
print(f"\n{'run':<44} {'kvraft ops/s':>12} {'etcd ops/s':>11} {'ratio':>6} {'kvraft p99':>11} {'etcd p99':>9}")
for k, e in zip(kv, et):
    name = f"{k['op']}, {k['clients']} clients / {k['conns']} conns"
    print(f"{name:<44} {k['ops_per_s']:>12.0f} {e['ops_per_s']:>11.0f} {k['ops_per_s'] / e['ops_per_s']:>5.2f}x {k['p99_ms']:>9.2f}ms {e['p99_ms']:>7.2f}ms")
PY
