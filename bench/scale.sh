#!/usr/bin/env bash
# How kvraft behaves as the data it holds grows, on one 3-node loopback
# cluster in one run (issue 11's targets; a benchmark, not a test):
#   1. small: puts over 10k keys (throughput, p99, p99.9, CPU per put);
#   2. fill: puts over FILL_SPACE keys until about 86% of them are held, then
#      as many again (churn), so the value log has reached the size its
#      garbage collection keeps it at (CHURN=0 skips that);
#   3. large: the same puts as (1) over the large key space, with the data held;
#      CPU per put of both is summed over the nodes (steadier than throughput
#      on a shared machine), in all and per kind of thread;
#   4. peak RSS of each node against the raw bytes of keys and values held;
#   5. PAIRS (default 3) more pairs of phases, alternately: puts over 10k keys
#      on a second, fresh 3-node cluster, then puts over the large key space
#      on the first. This machine's speed drifts by tens of percent within
#      minutes, more than the effect measured; phases taken in turn see the
#      same drift, so the median of the pairs' ratios is the steadier figure
#      (PAIRS=0 skips them);
#   6. a new member (--join + add-node) catching up with the leader;
#   7. kill -9 of every node, restart, time to the first linearizable read.
# Prints each phase's JSON and a summary table with the ratios the targets use.
#
# usage: bench/scale.sh [FILL_SPACE]   (default 600000: about 520k keys held)
#   BIN_DIR=DIR bench/scale.sh   runs the kvraftd and kvraft in DIR instead of
#   building this tree (to compare two builds on the same day, alternately).
# Takes several minutes (the fill dominates); not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
FILL_SPACE=${1:-600000}
WORK=$(mktemp -d)
B=${BIN_DIR:-target/release}
trap 'pkill -9 -f "kvraftd --id [0-9]* --data-dir $WORK" || true; rm -rf "$WORK"' EXIT

if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --locked --bin kvraftd --bin kvraft
fi

PAIRS=${PAIRS:-3}
# Node N's ports: client 17477 + 2N, peer 17478 + 2N. Nodes 1-4 are the
# cluster measured throughout; nodes 11-13 the small cluster of the pairs.
CLUSTER=1=127.0.0.1:17480,2=127.0.0.1:17482,3=127.0.0.1:17484
ENDPOINTS=127.0.0.1:17479,127.0.0.1:17481,127.0.0.1:17483
SMALL_CLUSTER=11=127.0.0.1:17500,12=127.0.0.1:17502,13=127.0.0.1:17504
SMALL_ENDPOINTS=127.0.0.1:17499,127.0.0.1:17501,127.0.0.1:17503
start() { # start ID [extra flags...]
  local i=$1
  shift
  "$B/kvraftd" --id "$i" --data-dir "$WORK/node-$i" --client-addr "127.0.0.1:$((17477 + 2 * i))" \
    --peer-addr "127.0.0.1:$((17478 + 2 * i))" --metrics-addr "" --log-filter warn "$@" \
    2>>"$WORK/node-$i.log" &
  echo $! >"$WORK/node-$i.pid"
  disown # kill -9 below is deliberate: no "Killed" notices from the shell
}
kv() { "$B/kvraft" --endpoints "${KV_ENDPOINTS:-$ENDPOINTS}" "$@"; }
bench() { # NAME ARGS...: one bench run, its JSON kept as NAME
  local name=$1
  shift
  echo "== $name: kvraft bench $*" >&2
  # The progress bar goes to a file; errors are in the JSON ("errors").
  kv --output json --timeout 30s bench "$@" --key-size 16 --val-size 256 2>>"$WORK/bench.log" |
    tee "$WORK/$name.json"
}
wait_writable() { # until the cluster kv talks to takes a write (20 s at most)
  local deadline=$(($(date +%s) + 20))
  until kv --timeout 1s set warm up >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      # The nodes' logs say why; the exit trap deletes them, so show them now.
      echo "the cluster at ${KV_ENDPOINTS:-$ENDPOINTS} took no write within 20 s; the last lines of each node's log:" >&2
      tail -n 5 "$WORK"/node-*.log >&2
      exit 1
    fi
    sleep 0.2
  done
}
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d$2)" "$WORK/$1.json"; }
now() { date +%s.%N; }

for i in 1 2 3; do start "$i" --initial-cluster "$CLUSTER"; done
wait_writable

# CPU (user + system clock ticks) of the three nodes, summed: in all ("all",
# from each process, which keeps the ticks of threads that ended) and per kind
# of thread (raft-loop, store-flusher, tokio-rt-worker, ...), which says which
# part of a node a change moved. On a shared machine the CPU each put costs
# varies far less from run to run than throughput does.
cpu_sample() { # N: written to $WORK/cpu-N
  for i in 1 2 3; do
    local pid
    pid=$(cat "$WORK/node-$i.pid")
    echo "all $(awk '{print $14 + $15}' "/proc/$pid/stat")"
    for task in /proc/"$pid"/task/*; do
      echo "$(sed 's/-[0-9]*$//; s/ /_/g' "$task/comm") $(awk '{print $14 + $15}' "$task/stat")"
    done
  done | awk '{s[$1] += $2} END {for (k in s) print k, s[k]}' | sort >"$WORK/cpu-$1"
}
# Long enough for several flushes (every 5 s) in each phase: the flusher's
# share of the CPU per put depends on how many fall inside it.
PHASE_PUTS=200000
cpu_sample 0
bench small put --clients 128 --conns 16 --total $PHASE_PUTS --key-space 10000
cpu_sample 1
bench fill put --clients 128 --conns 16 --total $((FILL_SPACE * 2)) --key-space "$FILL_SPACE"
if [ "${CHURN:-1}" != 0 ]; then
  bench churn put --clients 128 --conns 16 --total $((FILL_SPACE * 2)) --key-space "$FILL_SPACE"
fi
cpu_sample 2
bench large put --clients 128 --conns 16 --total $PHASE_PUTS --key-space "$FILL_SPACE"
cpu_sample 3

kv --output json info >"$WORK/info.json"
keys=$(json info "['keys']")
raw=$((keys * (16 + 256)))
# Node 1's files: the value log (what collection keeps) and the B-tree.
segments=$(find "$WORK/node-1/values" -name '*.seg' 2>/dev/null | wc -l)
newest=$(find "$WORK/node-1/values" -name '*.seg' 2>/dev/null | sort | tail -1 | xargs -r basename)
disk="value log $(du -sm "$WORK/node-1/values" | cut -f1) MiB in $segments segments (newest ${newest:-none}), \
state.redb $(du -sm "$WORK/node-1/state.redb" | cut -f1) MiB, for $((raw >> 20)) MiB of keys and values"

peak_rss=0
for i in 1 2 3; do
  rss=$(awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$(cat "$WORK/node-$i.pid")/status")
  [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
done

if [ "$PAIRS" -gt 0 ]; then
  echo "== $PAIRS pairs: 10k keys on a fresh cluster, then the large key space here, in turn" >&2
  for i in 11 12 13; do start "$i" --initial-cluster "$SMALL_CLUSTER"; done
  KV_ENDPOINTS=$SMALL_ENDPOINTS wait_writable
  # Each measured phase follows a warm-up of the same puts on the same
  # cluster (about one flush interval), as the large phase above follows the
  # churn: the flushes of the writes just before it fall inside it, as in a
  # steady state, and the other cluster's leftover flush falls in the
  # warm-up, not in the measurement.
  warm_up=75000
  for pair in $(seq "$PAIRS"); do
    KV_ENDPOINTS=$SMALL_ENDPOINTS bench "warm-small-$pair" put --clients 128 --conns 16 --total $warm_up --key-space 10000 >/dev/null
    KV_ENDPOINTS=$SMALL_ENDPOINTS bench "small-$pair" put --clients 128 --conns 16 --total $PHASE_PUTS --key-space 10000
    bench "warm-large-$pair" put --clients 128 --conns 16 --total $warm_up --key-space "$FILL_SPACE" >/dev/null
    bench "large-$pair" put --clients 128 --conns 16 --total $PHASE_PUTS --key-space "$FILL_SPACE"
  done
  for i in 11 12 13; do kill -9 "$(cat "$WORK/node-$i.pid")"; done
fi

echo "== a new member joins and catches up ($keys keys)" >&2
start 4 --join
joined_at=$(now)
kv --timeout 30s add-node 4 127.0.0.1:17486 --client-addr 127.0.0.1:17485 >/dev/null
target=$(kv --output json info | python3 -c "import json,sys; print(json.load(sys.stdin)['commit_index'])")
deadline=$(($(date +%s) + 600))
until applied=$("$B/kvraft" --endpoints 127.0.0.1:17485 --output json --timeout 2s --serializable info 2>/dev/null |
  python3 -c "import json,sys; print(json.load(sys.stdin)['applied_index'])") && [ "$applied" -ge "$target" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "node 4 did not catch up within 600 s" >&2; exit 1; }
  sleep 0.1
done
catch_up=$(python3 -c "print(f'{$(now) - $joined_at:.1f}')")

echo "== kill -9 of every node, restart, first linearizable read" >&2
for i in 1 2 3 4; do kill -9 "$(cat "$WORK/node-$i.pid")"; done
sleep 0.5
restarted_at=$(now)
for i in 1 2 3 4; do start "$i"; done
deadline=$(($(date +%s) + 120))
until kv --timeout 1s get warm >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "no linearizable read within 120 s of the restart" >&2; exit 1; }
  sleep 0.05
done
first_read=$(python3 -c "print(f'{$(now) - $restarted_at:.2f}')")

echo "disk of node 1: $disk"
python3 - "$WORK" "$keys" "$raw" "$peak_rss" "$catch_up" "$first_read" "$(getconf CLK_TCK)" "$PHASE_PUTS" "$PAIRS" <<'PY'
import json, statistics, sys
work, keys, raw, rss, catch_up, first_read = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
hz, puts, pairs = int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
small, large = (json.load(open(f"{work}/{n}.json")) for n in ("small", "large"))
row = lambda name, d: f"| {name} | {d['ops_per_s']:,.0f} | {d['p99_ms']:.1f} ms | {d['p999_ms']:.1f} ms | {d['max_ms']:.1f} ms |"
print()
print("| puts (128 clients, 16 conns) | ops/s | p99 | p99.9 | max |")
print("|---|---|---|---|---|")
print(row("over 10k keys", small))
print(row(f"over the large key space, {keys:,} keys held", large))
print()
print(f"large / small throughput: {large['ops_per_s'] / small['ops_per_s']:.2f}x (target >= 0.8x; p99.9 target < 50 ms)")
def per_put(a, b):  # µs of CPU per put between samples a and b, by kind
    read = lambda n: dict((k, int(v)) for k, v in (line.split() for line in open(f"{work}/cpu-{n}")))
    before, after = read(a), read(b)
    return {k: (after[k] - before.get(k, 0)) * 1e6 / hz / puts for k in after}
small_cpu, large_cpu = per_put(0, 1), per_put(2, 3)
print(f"CPU per put, 3 nodes summed: {small_cpu['all']:.0f} µs over 10k keys, {large_cpu['all']:.0f} µs with the data held ({small_cpu['all'] / large_cpu['all']:.2f}x)")
for kind in sorted(large_cpu, key=lambda k: -large_cpu[k]):
    if kind != "all" and (large_cpu[kind] >= 0.5 or small_cpu.get(kind, 0) >= 0.5):
        print(f"  {kind}: {small_cpu.get(kind, 0):.1f} µs over 10k keys, {large_cpu[kind]:.1f} µs with the data held")
print(f"peak RSS of any node: {rss / 2**20:,.0f} MiB for {raw / 2**20:,.0f} MiB of keys and values: {rss / raw:.1f}x (target <= 1.5x)")
print(f"a new member caught up in {catch_up} s (target <= 20 s)")
print(f"first linearizable read {first_read} s after kill -9 of every node (target <= 3 s)")
if pairs:
    print()
    print("| pair | over 10k keys (fresh cluster) | over the large key space (this cluster) | ratio | p99.9 held |")
    print("|---|---|---|---|---|")
    ratios, tails = [], []
    for n in range(1, pairs + 1):
        s, l = (json.load(open(f"{work}/{kind}-{n}.json")) for kind in ("small", "large"))
        ratios.append(l["ops_per_s"] / s["ops_per_s"])
        tails.append(l["p999_ms"])
        print(f"| {n} | {s['ops_per_s']:,.0f} | {l['ops_per_s']:,.0f} | {ratios[-1]:.2f}x | {l['p999_ms']:.1f} ms |")
    print(f"median of {pairs} pairs: {statistics.median(ratios):.2f}x (target >= 0.8x), p99.9 held {statistics.median(tails):.1f} ms (target < 50 ms)")
PY
