#!/usr/bin/env bash
# Benchmarks kvraft against etcd 3.4 (Debian's etcd-server) on this machine,
# the same way: three members on loopback, the same load generator semantics
# (`kvraft bench` and bench/etcd-baseline mirror each other), back to back,
# each in plaintext and with TLS on both ports (client certificates required,
# mutual TLS between members; certificates from `kvraft certs init`).
# Prints each run's JSON and a table: TLS against plaintext for each system,
# and kvraft against etcd in each mode.
#
# usage: bench/compare.sh [TOTAL]        (default 100000 requests per run)
# 100000 rather than 30000: at 30000 the linearizable get phase lasts 0.7 s,
# so one scheduler hiccup on a 2-core machine decides its figure (4.33x one
# morning, 6.08x with 100000 an hour later). A run takes about 8 minutes.
# Installs etcd-server, etcd-client (etcdctl) and protobuf-compiler (etcd-client's build needs protoc)
# with apt-get if missing. Takes several minutes; not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-100000}
WORK=$(mktemp -d)
trap 'pkill -f "kvraftd --id [123] --data-dir $WORK" || true; for m in plain tls; do bash bench/etcd-cluster.sh stop "$WORK/etcd-$m" >/dev/null 2>&1 || true; done; rm -rf "$WORK"' EXIT

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --bin kvraftd --bin kvraft
(cd bench/etcd-baseline && cargo build --release --locked)

B=target/release
CERTS="$WORK/certs"
"$B/kvraft" certs init "$CERTS" --nodes 1=127.0.0.1,2=127.0.0.1,3=127.0.0.1 --clients admin >/dev/null
CLIENT_TLS=(--cacert "$CERTS/ca.pem" --cert "$CERTS/client-admin.pem" --key "$CERTS/client-admin.key")

LOAD="--key-size 16 --val-size 256 --key-space 10000"
RUNS=(
  "put --clients 128 --conns 16 --total $TOTAL"
  "get --clients 128 --conns 16 --total $TOTAL"
  "get --clients 128 --conns 16 --total $TOTAL --serializable"
  "put --clients 1 --conns 1 --total $((TOTAL / 10))"
  "txn --clients 128 --conns 16 --total $TOTAL"
  "watch --clients 16 --conns 16 --total $((TOTAL / 10)) --watchers 100"
)

# kvraft MODE: three kvraftd on 127.0.0.1, every run, results in $WORK/kvraft-MODE.json.
kvraft() {
  local mode=$1 tls=() client=() i
  [ "$mode" = tls ] && client=("${CLIENT_TLS[@]}")
  echo "== kvraft ($mode): 3 members on 127.0.0.1"
  local cluster=1=127.0.0.1:17380,2=127.0.0.1:17382,3=127.0.0.1:17384
  for i in 1 2 3; do
    if [ "$mode" = tls ]; then
      tls=(--cert-file "$CERTS/node-$i.pem" --key-file "$CERTS/node-$i.key" --trusted-ca-file "$CERTS/ca.pem"
        --client-cert-auth --peer-cert-file "$CERTS/node-$i.pem" --peer-key-file "$CERTS/node-$i.key"
        --peer-trusted-ca-file "$CERTS/ca.pem")
    fi
    "$B/kvraftd" --id $i --data-dir "$WORK/kv-$mode-$i" --client-addr 127.0.0.1:$((17377 + 2 * i)) \
      --peer-addr 127.0.0.1:$((17378 + 2 * i)) --metrics-addr "" --initial-cluster $cluster \
      --log-filter warn "${tls[@]}" 2>"$WORK/kv-$mode-$i.log" &
  done
  local e=127.0.0.1:17379,127.0.0.1:17381,127.0.0.1:17383
  for _ in $(seq 50); do "$B/kvraft" --endpoints $e "${client[@]}" --timeout 1s set warm up >/dev/null 2>&1 && break; sleep 0.2; done
  : >"$WORK/kvraft-$mode.json"
  for run in "${RUNS[@]}"; do
    set -- $run
    local op=$1 serializable="" args
    shift
    [[ " $* " == *" --serializable "* ]] && serializable="--serializable"
    args=$(echo "$*" | sed 's/--serializable//')
    # shellcheck disable=SC2086
    "$B/kvraft" --endpoints $e "${client[@]}" --output json --timeout 10s $serializable bench $op $LOAD $args 2>/dev/null |
      tee -a "$WORK/kvraft-$mode.json"
  done
  pkill -f "kvraftd --id [123] --data-dir $WORK" || true
  sleep 1
}

# etcd MODE: the same against three etcd members.
etcd() {
  local mode=$1 certs="" client=()
  [ "$mode" = tls ] && certs="$CERTS" && client=("${CLIENT_TLS[@]}")
  echo "== etcd $(command etcd --version | head -1 | awk '{print $3}') ($mode): 3 members on 127.0.0.1"
  bash bench/etcd-cluster.sh start "$WORK/etcd-$mode" $certs >/dev/null
  local eb=bench/etcd-baseline/target/release/etcd-baseline
  : >"$WORK/etcd-$mode.json"
  for run in "${RUNS[@]}"; do
    # shellcheck disable=SC2086
    "$eb" --endpoints 127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793 "${client[@]}" --output json $run $LOAD 2>/dev/null |
      tee -a "$WORK/etcd-$mode.json"
  done
  bash bench/etcd-cluster.sh stop "$WORK/etcd-$mode" >/dev/null
}

kvraft plain
kvraft tls
etcd plain
etcd tls

python3 - "$WORK" <<'PY'
import json, sys
load = lambda name: [json.loads(l) for l in open(f"{sys.argv[1]}/{name}.json") if l.strip()]
kp, kt, ep, et = load("kvraft-plain"), load("kvraft-tls"), load("etcd-plain"), load("etcd-tls")
print(f"\n{'run':<44} {'kvraft':>8} {'kvraft':>8} {'etcd':>8} {'etcd':>8} | {'TLS/plain':>9} {'TLS/plain':>9} | {'kvraft/etcd':>11} {'kvraft/etcd':>11}")
print(f"{'(ops/s; p99 below)':<44} {'plain':>8} {'TLS':>8} {'plain':>8} {'TLS':>8} | {'kvraft':>9} {'etcd':>9} | {'plain':>11} {'TLS':>11}")
for a, b, c, d in zip(kp, kt, ep, et):
    name = f"{a['op']}, {a['clients']} clients / {a['conns']} conns" + (f" / {a['watchers']} watchers" if a.get('watchers') else "")
    r = lambda x, y: x["ops_per_s"] / y["ops_per_s"]
    print(f"{name:<44} {a['ops_per_s']:>8.0f} {b['ops_per_s']:>8.0f} {c['ops_per_s']:>8.0f} {d['ops_per_s']:>8.0f} | "
          f"{r(b, a):>8.2f}x {r(d, c):>8.2f}x | {r(a, c):>10.2f}x {r(b, d):>10.2f}x")
    print(f"{'  p99 ms':<44} {a['p99_ms']:>8.2f} {b['p99_ms']:>8.2f} {c['p99_ms']:>8.2f} {d['p99_ms']:>8.2f}")
PY
