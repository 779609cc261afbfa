#!/usr/bin/env bash
# Runs packaging/systemd/kvraft.service and kvraft@.service under a real
# systemd: PID 1 of a Docker container whose root is a minimal Debian made with
# debootstrap (from Debian's package archive; no container registry), with no
# network but its loopback. Checks what `systemd-analyze` can't: that the
# sandbox lets the daemon run (seccomp filter, ProtectSystem, PrivateUsers,
# MemoryDenyWriteExecute...), Type=notify readiness and STATUS=, the dynamic
# user and its 0700 state directory, ExecReload, the watchdog restarting a
# stopped (SIGSTOP) daemon, graceful stop with leadership handover and a final
# checkpoint, and three template instances forming a cluster. Then the TLS
# drop-ins (kvraft.service.d/tls.conf, kvraft@.service.d/tls.conf) with
# certificates from `kvraft certs init` in /etc/kvraft/tls, keys root-only:
# LoadCredential= hands them to the dynamic user, a TLS client works, a
# plaintext one is refused, a reload keeps serving, and the three instances
# form a cluster over mutual TLS.
#
#   packaging/systemd/container-test.sh KVRAFTD KVRAFT
#
# KVRAFTD and KVRAFT must be static binaries (crt-static) or built for the
# container's Debian. The rootfs is cached as a tarball at
# $KVRAFT_SYSTEMD_ROOTFS (default /var/tmp/kvraft-systemd-rootfs.tar).
# If the container engine can't run systemd as PID 1 here (it needs nearly
# all capabilities), this says so and exits 0 without testing: that is the
# host's limit, not the unit's.
# in_ct runs its argument in the container: $(...) in single quotes is meant.
# shellcheck disable=SC2016
set -euo pipefail

[ $# = 2 ] || { echo "usage: $0 KVRAFTD KVRAFT" >&2; exit 2; }
KVRAFTD="$(realpath "$1")"
KVRAFT="$(realpath "$2")"
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ROOTFS_TAR="${KVRAFT_SYSTEMD_ROOTFS:-/var/tmp/kvraft-systemd-rootfs.tar}"
MIRROR="${KVRAFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
IMAGE="kvraft-systemd-test:$$"
NAME="kvraft-systemd-test-$$"

step() { echo "== systemd-test: $*"; }
fail() {
  echo "systemd-test: FAIL: $*" >&2
  exit 1
}
# A host that can't run systemd in a container skips the test, except in CI
# (KVRAFT_NO_SKIP=1, set by .ci/run), where a skip is a failure.
skip() {
  [ "${KVRAFT_NO_SKIP:-0}" != 1 ] || fail "$* (KVRAFT_NO_SKIP=1: a skip is a failure)"
  echo "== systemd-test: SKIPPED: $*"
  exit 0
}

WORK="$(mktemp -d)"
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && docker inspect "$NAME" >/dev/null 2>&1; then
    echo "== systemd-test: journal of the kvraft units (rc=$rc)" >&2
    docker exec "$NAME" journalctl --no-pager -o short-precise -n 80 -u 'kvraft*' >&2 || true
  fi
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker rmi "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------- rootfs --
if [ ! -s "$ROOTFS_TAR" ]; then
  step "making a minimal Debian bookworm with systemd (debootstrap, $MIRROR)"
  command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
  }
  debootstrap --variant=minbase --include=systemd,systemd-sysv,procps bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
  mkdir -p "$(dirname "$ROOTFS_TAR")"
  tar -C "$WORK/rootfs" -cf "$ROOTFS_TAR.tmp" . && mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf "$WORK/rootfs"
fi
step "importing the rootfs as $IMAGE"
docker import -c 'ENV container=docker' "$ROOTFS_TAR" "$IMAGE" >/dev/null

# ------------------------------------------------------------------ files --
mkdir -p "$WORK/etc-kvraft"
install -m 0644 "$REPO/packaging/kvraft.example.toml" "$WORK/etc-kvraft/kvraft.toml"
for n in 1 2 3; do
  cat >"$WORK/etc-kvraft/node$n.toml" <<EOF
id = $n
client_addr = "127.0.0.1:74${n}0"
peer_addr = "127.0.0.1:74${n}1"
initial_cluster = "1=127.0.0.1:7411,2=127.0.0.1:7421,3=127.0.0.1:7431"
EOF
  chmod 0644 "$WORK/etc-kvraft/node$n.toml"
done
# For the TLS drop-ins, laid out as their comments say: ca.pem, node.pem/.key
# for kvraft.service (node 1), nodeN.pem/.key for kvraft@nodeN; root-owned,
# keys 0600 (certs init makes them so), which the services' dynamic user
# could not read directly.
"$KVRAFT" certs init "$WORK/etc-kvraft/tls" --nodes 1=localhost,2=localhost,3=localhost --clients admin,reader >/dev/null
ln -s node-1.pem "$WORK/etc-kvraft/tls/node.pem"
ln -s node-1.key "$WORK/etc-kvraft/tls/node.key"
for n in 1 2 3; do
  ln -s "node-$n.pem" "$WORK/etc-kvraft/tls/node$n.pem"
  ln -s "node-$n.key" "$WORK/etc-kvraft/tls/node$n.key"
done
# kvraft.example.toml serves metrics on 127.0.0.1:9379 if this build has them;
# the instances must not collide with it.
if grep -q '^metrics_addr' "$WORK/etc-kvraft/kvraft.toml"; then
  for n in 1 2 3; do echo "metrics_addr = \"127.0.0.1:74${n}2\"" >>"$WORK/etc-kvraft/node$n.toml"; done
fi

# ---------------------------------------------------------------- systemd --
# A private cgroup namespace: with the host's (the default on cgroup v1 hosts)
# systemd exits at once.
step "booting systemd in container $NAME (no network but loopback)"
run_args=(-d --name "$NAME" --network none --cgroupns=private --tmpfs /run --tmpfs /run/lock --tmpfs /tmp
  --stop-signal SIGRTMIN+3
  -v "$KVRAFTD:/usr/bin/kvraftd:ro" -v "$KVRAFT:/usr/bin/kvraft:ro"
  -v "$HERE/kvraft.service:/etc/systemd/system/kvraft.service:ro"
  -v "$HERE/kvraft@.service:/etc/systemd/system/kvraft@.service:ro"
  -v "$WORK/etc-kvraft:/etc/kvraft:ro")
# --privileged where the engine allows it; else every capability the engine
# itself has (a sandboxed engine may lack some, e.g. CAP_SYS_RESOURCE).
if ! docker run --privileged "${run_args[@]}" "$IMAGE" /lib/systemd/systemd >/dev/null 2>"$WORK/run.err"; then
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  engine_bnd="$(grep CapBnd "/proc/$(pgrep -xo dockerd)/status" 2>/dev/null | awk '{print $2}')"
  drops=()
  if [ -n "$engine_bnd" ]; then
    for ((bit = 0; bit <= 40; bit++)); do
      if (((0x$engine_bnd >> bit & 1) == 0)); then
        case $bit in
          24) drops+=(--cap-drop SYS_RESOURCE) ;;
          21) drops+=(--cap-drop SYS_ADMIN) ;;
          16) drops+=(--cap-drop SYS_MODULE) ;;
          25) drops+=(--cap-drop SYS_TIME) ;;
        esac
      fi
    done
  fi
  docker run --cap-add ALL "${drops[@]}" --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    "${run_args[@]}" "$IMAGE" /lib/systemd/systemd >/dev/null 2>>"$WORK/run.err" || {
    cat "$WORK/run.err" >&2
    skip "this Docker engine can't start a container that runs systemd (above)"
  }
fi
in_ct() { docker exec "$NAME" bash -c "$1"; }
booted=0
for ((i = 0; i < 60; i++)); do
  state="$(docker exec "$NAME" systemctl is-system-running 2>/dev/null || true)"
  case "$state" in running | degraded) booted=1; break ;; esac
  sleep 1
done
if [ "$booted" != 1 ]; then
  docker logs "$NAME" 2>&1 | tail -20 >&2
  skip "systemd did not boot in the container (state '$state'): a limit of this host"
fi
echo "   systemd $(in_ct 'systemctl --version | head -1 | cut -d" " -f2') is up ($state)"
# On a host systemd makes / a shared mount at boot; in a container it leaves
# that to the container manager, and Docker's mounts are private. LoadCredential=
# fills a fresh mount in a helper's namespace and moves it into place, which
# only reaches the manager's namespace through shared propagation: without
# this, every service sees an empty root-only credentials directory.
in_ct 'mount --make-rshared /' || fail "mount --make-rshared / failed"

# ---------------------------------------------------------- kvraft.service --
step "kvraft.service with the shipped example config"
in_ct 'systemctl start kvraft.service' || fail "systemctl start kvraft.service failed"
in_ct 'systemctl is-active -q kvraft.service' || fail "kvraft.service is not active"
for ((i = 0; i < 20; i++)); do
  status="$(in_ct 'systemctl show -p StatusText --value kvraft.service')"
  case "$status" in leader*) break ;; esac
  sleep 1
done
case "$status" in leader*) ;; *) fail "STATUS= is '$status', expected a leader of a one-node cluster" ;; esac
echo "   active, STATUS=\"$status\""
pid="$(in_ct 'systemctl show -p MainPID --value kvraft.service')"
proc="$(in_ct "grep -E '^(Uid|CapEff|NoNewPrivs|Seccomp):' /proc/$pid/status")"
uid="$(awk '/^Uid:/ {print $2}' <<<"$proc")"
[ "$uid" != 0 ] || fail "kvraftd runs as root"
grep -q '^CapEff:[[:space:]]*0000000000000000' <<<"$proc" || fail "kvraftd has capabilities: $proc"
grep -q '^NoNewPrivs:[[:space:]]*1' <<<"$proc" || fail "NoNewPrivs is not set"
grep -q '^Seccomp:[[:space:]]*2' <<<"$proc" || fail "no seccomp filter"
mode="$(in_ct 'stat -c "%a %u" /var/lib/private/kvraft')"
[ "$mode" = "700 $uid" ] || fail "state directory is '$mode', expected '700 $uid'"
echo "   dynamic uid $uid, no capabilities, no_new_privs, seccomp filter, /var/lib/private/kvraft 0700"
in_ct 'kvraft set greeting hello >/dev/null && test "$(kvraft get greeting)" = hello' || fail "set/get through kvraft.service"
echo "   set/get OK"
if grep -q '^metrics_addr' "$WORK/etc-kvraft/kvraft.toml"; then
  rss="$(in_ct 'exec 3<>/dev/tcp/127.0.0.1/9379; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' |
    awk '$1 == "process_resident_memory_bytes" {print $2}')"
  [ -n "$rss" ] && [ "${rss%.*}" -gt 0 ] || fail "/metrics has no process RSS under ProtectProc/ProcSubset (got '$rss')"
  echo "   /metrics answers; process RSS $rss bytes read from /proc inside the sandbox"
fi
score="$(in_ct 'systemd-analyze security --no-pager kvraft.service' | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
echo "   systemd-analyze security (live unit): $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' || fail "live exposure '$score' is above 1.5"

step "systemctl reload kvraft (SIGHUP)"
in_ct 'systemctl reload kvraft.service' || fail "reload failed"
sleep 1
# The success message only: "SIGHUP: configuration not reloaded" must not pass.
in_ct 'systemctl is-active -q kvraft.service && journalctl -u kvraft.service --no-pager -o cat | grep -q "SIGHUP: log filter reloaded"' ||
  fail "no successful SIGHUP reload in the journal, or the unit is no longer active"
echo "   reloaded, still active"

step "watchdog: SIGSTOP the daemon; systemd must restart it within WatchdogSec"
in_ct "kill -STOP $pid"
restarted=0
for ((i = 0; i < 60; i++)); do
  if [ "$(in_ct 'systemctl show -p NRestarts --value kvraft.service')" -ge 1 ] &&
    in_ct 'systemctl is-active -q kvraft.service'; then
    restarted=1
    break
  fi
  sleep 1
done
[ "$restarted" = 1 ] || fail "kvraft.service was not restarted within 60 s of SIGSTOP"
in_ct 'journalctl -u kvraft.service --no-pager -o cat | grep -q "Watchdog timeout"' || fail "restart was not due to the watchdog"
in_ct 'for i in $(seq 20); do v=$(kvraft get greeting 2>/dev/null) && break; sleep 1; done; test "$v" = hello' ||
  fail "the value written before the watchdog restart is gone"
echo "   watchdog timeout -> restarted after ~${i} s; data intact"

step "a configuration error (exit 78) fails the unit at once: no restart loop"
in_ct 'mkdir -p /run/systemd/system/kvraft.service.d &&
  printf "[Service]\nEnvironment=KVRAFT_ELECTION_TICKS=1\n" >/run/systemd/system/kvraft.service.d/zz-bad.conf &&
  systemctl daemon-reload'
in_ct 'systemctl restart kvraft.service' && fail "kvraft.service started with election_ticks = 1"
# With Restart=on-failure a restartable exit would leave the unit
# "activating (auto-restart)"; a prevented one leaves it failed. (NRestarts
# counts automatic restarts since the manual one.)
state="$(in_ct 'for p in ActiveState SubState ExecMainStatus NRestarts; do systemctl show -p $p --value kvraft.service; done' | paste -sd' ')"
[ "$state" = "failed failed 78 0" ] ||
  fail "after a configuration error: ActiveState SubState ExecMainStatus NRestarts = '$state', expected 'failed failed 78 0'"
in_ct 'journalctl -u kvraft.service --no-pager -o cat | grep -q "election_ticks (from environment variable KVRAFT_ELECTION_TICKS)"' ||
  fail "the journal does not say which setting was wrong"
in_ct 'rm /run/systemd/system/kvraft.service.d/zz-bad.conf && systemctl daemon-reload && systemctl reset-failed kvraft.service &&
  systemctl start kvraft.service' || fail "kvraft.service did not start again once the setting was fixed"
in_ct 'for i in $(seq 20); do v=$(kvraft get greeting 2>/dev/null) && break; sleep 1; done; test "$v" = hello' ||
  fail "the value written before is gone after the configuration error"
echo "   exit 78, unit failed with no restart, the journal names the key; fixed and started again, data intact"

# ---------------------------------------------------------- kvraft@.service --
step "kvraft@node1..3: three instances form a cluster"
in_ct 'systemctl start kvraft@node1 kvraft@node2 kvraft@node3' || fail "starting the template instances failed"
ep=127.0.0.1:7410,127.0.0.1:7420,127.0.0.1:7430
leader=""
for ((i = 0; i < 30; i++)); do
  leader="$(in_ct "kvraft --endpoints $ep members 2>/dev/null" | awk '$2 == "leader" {print $1}')"
  [ -n "$leader" ] && break
  sleep 1
done
[ -n "$leader" ] || fail "the three instances elected no leader in 30 s"
in_ct "kvraft --endpoints $ep members"
in_ct 'kvraft --endpoints 127.0.0.1:7420 set k v >/dev/null && test "$(kvraft --endpoints 127.0.0.1:7430 get k)" = v' ||
  fail "set through node2 / get through node3"
in_ct 'for n in 1 2 3; do test "$(stat -c %a /var/lib/private/kvraft-node$n)" = 700 || exit 1; done' ||
  fail "instance state directories are not 0700"
echo "   leader node $leader; set/get across instances OK; /var/lib/private/kvraft-node{1,2,3} 0700"

step "graceful stop of the leader (kvraft@node$leader)"
start=$(date +%s)
in_ct "systemctl stop kvraft@node$leader"
took=$(($(date +%s) - start))
result="$(in_ct "systemctl show -p Result --value kvraft@node$leader")"
[ "$result" = success ] || fail "stop result '$result' (exit status $(in_ct "systemctl show -p ExecMainStatus --value kvraft@node$leader"))"
in_ct "journalctl -u kvraft@node$leader --no-pager -o cat | grep -q 'transferring leadership'" || fail "no leadership transfer logged"
in_ct "journalctl -u kvraft@node$leader --no-pager -o cat | grep -q 'shutdown checkpoint'" || fail "no shutdown checkpoint logged"
in_ct "kvraft --endpoints $ep set after-stop yes >/dev/null" || fail "the other two instances don't take writes after the stop"
echo "   stopped in ${took} s (exit 0) with leadership handover and a final checkpoint (the store made durable); the others go on"

# ------------------------------------------------------------ TLS drop-ins --
step "TLS drop-in on kvraft.service: certificates as credentials, both ports"
docker cp "$HERE/kvraft.service.d" "$NAME:/etc/systemd/system/"
docker cp "$HERE/kvraft@.service.d" "$NAME:/etc/systemd/system/"
in_ct 'systemctl daemon-reload && systemctl restart kvraft.service' || fail "restart with the TLS drop-in failed"
in_ct 'systemctl is-active -q kvraft.service' || fail "kvraft.service is not active with the TLS drop-in"
tls='--cacert /etc/kvraft/tls/ca.pem --cert /etc/kvraft/tls/client-admin.pem --key /etc/kvraft/tls/client-admin.key'
in_ct "for i in \$(seq 20); do v=\$(kvraft $tls get greeting 2>/dev/null) && break; sleep 1; done; test \"\$v\" = hello" ||
  fail "TLS get of the value written before the drop-in"
in_ct "kvraft $tls set tls on >/dev/null && test \"\$(kvraft $tls get tls)\" = on" || fail "TLS set/get through kvraft.service"
echo "   TLS client (admin certificate): set/get OK, data from before intact"
plain="$(in_ct 'kvraft --timeout 3s ping 2>&1; echo "exit=$?"')"
grep -q 'exit=2' <<<"$plain" && grep -q 'requires TLS' <<<"$plain" ||
  fail "a plaintext client was not refused with exit 2 and 'requires TLS': $plain"
echo "   plaintext client refused: $(head -1 <<<"$plain")"
pid="$(in_ct 'systemctl show -p MainPID --value kvraft.service')"
in_ct "tr '\\0' '\\n' </proc/$pid/environ | grep -qx KVRAFT_CERT_FILE=/run/credentials/kvraft.service/node.pem" ||
  fail "%d did not expand to the credentials directory in KVRAFT_CERT_FILE"
uid="$(in_ct "awk '/^Uid:/ {print \$2}' /proc/$pid/status")"
cred="$(in_ct 'stat -L -c "%a %u" /run/credentials/kvraft.service/node.key')"
[ "$cred" = "400 $uid" ] || fail "the key credential is '$cred', expected '400 $uid' (the dynamic user's)"
host="$(in_ct 'stat -L -c "%a %u" /etc/kvraft/tls/node.key')"
[ "$host" = "600 0" ] || fail "the host key is '$host', expected root-only '600 0'"
echo "   the host key is root-only ($host); the service reads its copy %d/node.key ($cred, dynamic uid $uid)"
score="$(in_ct 'systemd-analyze security --no-pager kvraft.service' | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
echo "   systemd-analyze security (live unit with the drop-in): $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' || fail "live exposure with the drop-in '$score' is above 1.5"

step "systemctl reload kvraft (SIGHUP) with TLS: certificates re-read, still serving"
in_ct 'systemctl reload kvraft.service' || fail "reload failed"
reloaded=0
for ((i = 0; i < 10; i++)); do
  if in_ct 'journalctl -u kvraft.service --no-pager -o cat | grep "TLS certificates reloaded" | grep -q SIGHUP'; then
    reloaded=1
    break
  fi
  sleep 1
done
[ "$reloaded" = 1 ] || fail "no TLS reload on SIGHUP in the journal"
in_ct 'systemctl is-active -q kvraft.service' || fail "kvraft.service is not active after the reload"
in_ct "kvraft $tls ping >/dev/null && test \"\$(kvraft $tls get tls)\" = on" || fail "TLS client after the reload"
echo "   reloaded, still active and serving TLS"

step "kvraft@node1..3 with the TLS drop-in: a cluster over mutual TLS"
in_ct 'systemctl restart kvraft@node1 kvraft@node2 kvraft@node3' || fail "restarting the instances with TLS failed"
leader=""
for ((i = 0; i < 30; i++)); do
  leader="$(in_ct "kvraft $tls --endpoints $ep members 2>/dev/null" | awk '$2 == "leader" {print $1}')"
  [ -n "$leader" ] && break
  sleep 1
done
[ -n "$leader" ] || fail "the three TLS instances elected no leader in 30 s"
in_ct "kvraft $tls --endpoints 127.0.0.1:7420 set k tls >/dev/null && test \"\$(kvraft $tls --endpoints 127.0.0.1:7430 get k)\" = tls" ||
  fail "TLS set through node2 / get through node3"
in_ct "test \"\$(kvraft $tls --endpoints 127.0.0.1:7410 --serializable get after-stop)\" = yes" ||
  fail "the instance stopped before, restarted with TLS, lacks the value written while it was down"
for n in 1 2 3; do
  p="$(in_ct "systemctl show -p MainPID --value kvraft@node$n")"
  in_ct "tr '\\0' '\\n' </proc/$p/environ | grep -qx KVRAFT_PEER_CERT_FILE=/run/credentials/kvraft@node$n.service/node.pem" ||
    fail "kvraft@node$n does not use its credential for peer TLS"
done
plain="$(in_ct 'kvraft --endpoints 127.0.0.1:7420 --timeout 3s ping 2>&1; echo "exit=$?"')"
grep -q 'exit=2' <<<"$plain" || fail "a plaintext client was not refused by kvraft@node2: $plain"
echo "   leader node $leader; peer TLS with each instance's own credential; set/get across instances OK; plaintext refused"

step "PASS: both units run under systemd with their full sandbox, and with the TLS drop-ins"
