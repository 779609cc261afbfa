#!/usr/bin/env bash
# Throwaway 3-member etcd 3.4 cluster on loopback, for benchmarking.
#   etcd-cluster.sh start DIR [CERTS]
#                               start members etcd1..3 (data in DIR/etcdN.data,
#                               logs in DIR/etcdN.log, pids in DIR/etcdN.pid) and
#                               wait until `etcdctl endpoint health` passes on all;
#                               with CERTS (a `kvraft certs init` dir with nodes
#                               1-3 and client "admin"), TLS on both ports with
#                               client certificates required, as kvraft runs
#   etcd-cluster.sh stop DIR    kill the members started for DIR (data is kept)
# Client ports 23791-23793, peer ports 23801-23803, 127.0.0.1 only.
set -euo pipefail

ETCD=${ETCD:-/usr/bin/etcd}
ETCDCTL=${ETCDCTL:-/usr/bin/etcdctl}
HOST=127.0.0.1
ENDPOINTS="$HOST:23791,$HOST:23792,$HOST:23793"
CLUSTER="etcd1=http://$HOST:23801,etcd2=http://$HOST:23802,etcd3=http://$HOST:23803"

# etcd reads ETCD_* variables as flags; don't let stray ones leak in.
for v in $(compgen -e | grep '^ETCD_' || true); do unset "$v"; done
export ETCDCTL_API=3

usage() { echo "usage: $0 start DIR [CERTS] | stop DIR" >&2; exit 2; }

# Prints the pid in DIR/etcdN.pid if it is still a live etcd for that data dir.
live_pid() {
  local dir=$1 n=$2 pid
  [[ -f $dir/etcd$n.pid ]] || return 1
  pid=$(<"$dir/etcd$n.pid")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "--data-dir $dir/etcd$n.data" || return 1
  echo "$pid"
}

# True while pid exists and is not a zombie.
is_running() {
  local st
  st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) || return 1
  [[ -n $st && $st != Z ]]
}

start() {
  local dir=$1 certs=${2:-} n pid scheme=http
  local tls=() ctl=()
  if [[ -n $certs ]]; then
    certs=$(cd "$certs" && pwd)
    scheme=https
    ctl=(--cacert "$certs/ca.pem" --cert "$certs/client-admin.pem" --key "$certs/client-admin.key")
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  for n in 1 2 3; do
    if pid=$(live_pid "$dir" $n); then echo "etcd$n already running (pid $pid)" >&2; exit 1; fi
    for port in 2379$n 2380$n; do
      if ss -Hltn "sport = :$port" | grep -q .; then echo "port $port is in use" >&2; exit 1; fi
    done
  done
  for n in 1 2 3; do
    if [[ -n $certs ]]; then
      tls=(--cert-file "$certs/node-$n.pem" --key-file "$certs/node-$n.key"
        --trusted-ca-file "$certs/ca.pem" --client-cert-auth
        --peer-cert-file "$certs/node-$n.pem" --peer-key-file "$certs/node-$n.key"
        --peer-trusted-ca-file "$certs/ca.pem" --peer-client-cert-auth)
    fi
    setsid "$ETCD" \
      --name etcd$n \
      --data-dir "$dir/etcd$n.data" \
      --listen-client-urls $scheme://$HOST:2379$n \
      --advertise-client-urls $scheme://$HOST:2379$n \
      --listen-peer-urls $scheme://$HOST:2380$n \
      --initial-advertise-peer-urls $scheme://$HOST:2380$n \
      --initial-cluster "${CLUSTER//http:/$scheme:}" \
      "${tls[@]}" \
      --initial-cluster-token etcdbench \
      --initial-cluster-state new \
      </dev/null >>"$dir/etcd$n.log" 2>&1 &
    echo $! >"$dir/etcd$n.pid"
  done
  for _ in $(seq 1 60); do
    if "$ETCDCTL" --endpoints "$ENDPOINTS" "${ctl[@]}" --dial-timeout 2s --command-timeout 3s \
        endpoint health >/dev/null 2>&1; then
      "$ETCDCTL" --endpoints "$ENDPOINTS" "${ctl[@]}" endpoint health
      return 0
    fi
    for n in 1 2 3; do
      live_pid "$dir" $n >/dev/null || { echo "etcd$n exited; see $dir/etcd$n.log" >&2; stop "$dir"; exit 1; }
    done
    sleep 0.5
  done
  echo "cluster not healthy after 30s; see $dir/etcd*.log" >&2
  stop "$dir"
  exit 1
}

stop() {
  local dir=$1 n pid pids=()
  dir=$(cd "$dir" && pwd)
  for n in 1 2 3; do
    if pid=$(live_pid "$dir" $n); then kill -TERM "$pid"; pids+=("$pid"); fi
  done
  for _ in $(seq 1 50); do
    local alive=()
    for pid in "${pids[@]}"; do is_running "$pid" && alive+=("$pid"); done
    pids=("${alive[@]}")
    [[ ${#pids[@]} -eq 0 ]] && { echo "stopped"; return 0; }
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  echo "stopped (SIGKILL: ${pids[*]})"
}

[[ $# -ge 2 && $# -le 3 ]] || usage
case $1 in
  start) start "$2" "${3:-}" ;;
  stop) [[ -d $2 ]] || { echo "no such dir: $2" >&2; exit 1; }; stop "$2" ;;
  *) usage ;;
esac
