#!/usr/bin/env bash
# End-to-end test of the Docker packaging, runnable without a container
# registry: builds static kvraftd/kvraft on the host, builds the image's
# `prebuilt` target (FROM scratch: nothing is pulled), starts docker-compose.yml's
# three nodes (TLS on both ports, certificates from its one-shot `certs`
# service) under a unique project name, then through the published loopback
# ports only, with the CA and client certificates copied out of the volume:
#   - checks the certificate volume is private to the image's user (uid 10001),
#   - waits until the cluster has a leader and every container is healthy (the
#     health check pings over TLS), and peer TLS is on,
#   - a client without TLS is refused (exit 2, "TLS" in the message) and the
#     read-only identity `reader` can read but not write (exit 5),
#   - at the end, `up` again re-runs the certs service, which keeps every file,
#   - writes and reads through each node,
#   - docker kills the leader, writes and reads through the other two,
#   - starts it again and checks it caught up (serializable read through it),
# and always tears down what it created (containers, network, volumes, image).
#
# Needs: cargo, docker (engine running) and docker-compose or `docker compose`.
# Environment: CARGO_TARGET_DIR (default /tmp/kvraft-static),
# KVRAFT_E2E_PORT_BASE (default 27379: client ports BASE, BASE+2, BASE+4 and
# metrics ports BASE+1, BASE+3, BASE+5 on 127.0.0.1),
# KVRAFT_E2E_SKIP_BUILD=1 (reuse the binaries in CARGO_TARGET_DIR),
# KVRAFT_E2E_IMAGE=IMAGE (test an existing image instead, e.g. one built by
# `docker build -t kvraft .`: no cargo, no build; the kvraft CLI is copied out
# of the image; the image is left in place),
# KVRAFT_E2E_KEEP=1 (leave the cluster running for inspection).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/kvraft-static}"
TRIPLE="$(uname -m)-unknown-linux-gnu"
BIN_DIR="$CARGO_TARGET_DIR/$TRIPLE/release"
KVRAFT="$BIN_DIR/kvraft"
PREBUILT="$ROOT/packaging/docker/prebuilt"

PROJECT="kvraft-e2e-$$-$(date +%s)"
BASE="${KVRAFT_E2E_PORT_BASE:-27379}"
export KVRAFT_DOCKER_TARGET=prebuilt
export KVRAFT_IMAGE="${KVRAFT_E2E_IMAGE:-kvraft:$PROJECT}"
export KVRAFT_BIND=127.0.0.1
export KVRAFT_PORT_1=$BASE KVRAFT_PORT_2=$((BASE + 2)) KVRAFT_PORT_3=$((BASE + 4))
export KVRAFT_METRICS_PORT_1=$((BASE + 1)) KVRAFT_METRICS_PORT_2=$((BASE + 3)) KVRAFT_METRICS_PORT_3=$((BASE + 5))
# 65536 open files as in the unit, unless this host's hard limit is lower (runc
# refuses to raise it).
hard_nofile="$(ulimit -Hn)"
if [ "$hard_nofile" != unlimited ] && [ "$hard_nofile" -lt 65536 ]; then
  export KVRAFT_NOFILE="${KVRAFT_NOFILE:-$hard_nofile}"
fi
# No restart policy here: the test decides when the killed node comes back.
export KVRAFT_RESTART=no
P=(unused "127.0.0.1:$KVRAFT_PORT_1" "127.0.0.1:$KVRAFT_PORT_2" "127.0.0.1:$KVRAFT_PORT_3")
M=(unused "127.0.0.1:$KVRAFT_METRICS_PORT_1" "127.0.0.1:$KVRAFT_METRICS_PORT_2" "127.0.0.1:$KVRAFT_METRICS_PORT_3")
ALL="${P[1]},${P[2]},${P[3]}"

if docker-compose version >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  echo "compose-e2e: FAIL: neither docker-compose nor 'docker compose' is installed" >&2
  exit 1
fi
COMPOSE+=(-p "$PROJECT" -f "$ROOT/docker-compose.yml")

step() { echo "== compose-e2e: $*"; }
fail() {
  echo "compose-e2e: FAIL: $*" >&2
  exit 1
}

STARTED=0
TMP="$(mktemp -d)"
cleanup() {
  local rc=$?
  if [ "$STARTED" = 1 ]; then
    if [ "$rc" != 0 ]; then
      echo "== compose-e2e: container state and last log lines (rc=$rc)" >&2
      "${COMPOSE[@]}" ps >&2 || true
      "${COMPOSE[@]}" logs --no-color --tail 40 >&2 || true
    fi
    if [ "${KVRAFT_E2E_KEEP:-0}" = 1 ]; then
      echo "== compose-e2e: KVRAFT_E2E_KEEP=1: leaving project $PROJECT running; remove it with:"
      echo "   ${COMPOSE[*]} down -v --rmi all"
    else
      if [ -n "${KVRAFT_E2E_IMAGE:-}" ]; then
        step "tearing down project $PROJECT (containers, network, volumes; the image stays)"
        rmi=()
      else
        step "tearing down project $PROJECT (containers, network, volumes, image)"
        rmi=(--rmi all)
      fi
      "${COMPOSE[@]}" down -v "${rmi[@]}" --remove-orphans >/dev/null 2>&1 ||
        echo "compose-e2e: warning: teardown of $PROJECT failed" >&2
    fi
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- build ----
if [ -n "${KVRAFT_E2E_IMAGE:-}" ]; then
  STARTED=1
  step "testing the existing image $KVRAFT_IMAGE (no build)"
  docker image inspect "$KVRAFT_IMAGE" >/dev/null 2>&1 || fail "no image $KVRAFT_IMAGE"
  cid="$(docker create "$KVRAFT_IMAGE")"
  docker cp "$cid:/usr/bin/kvraft" "$TMP/kvraft" >/dev/null
  docker rm -v "$cid" >/dev/null
  KVRAFT="$TMP/kvraft"
else
  if [ "${KVRAFT_E2E_SKIP_BUILD:-0}" != 1 ]; then
    step "building static kvraftd and kvraft for $TRIPLE (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --locked --release --target "$TRIPLE" --bin kvraftd --bin kvraft
  fi
  [ -x "$BIN_DIR/kvraftd" ] && [ -x "$KVRAFT" ] || fail "no binaries in $BIN_DIR"
  if command -v ldd >/dev/null && ldd "$BIN_DIR/kvraftd" 2>&1 | grep -q '=>'; then
    fail "$BIN_DIR/kvraftd is dynamically linked; a FROM scratch image needs a static binary"
  fi

  step "staging the binaries in packaging/docker/prebuilt/ (gitignored)"
  for bin in kvraftd kvraft; do
    objcopy --strip-debug "$BIN_DIR/$bin" "$PREBUILT/usr/bin/$bin"
    chmod 0755 "$PREBUILT/usr/bin/$bin"
  done
  chmod 0700 "$PREBUILT/var/lib/kvraft"

  STARTED=1
  step "building image $KVRAFT_IMAGE (target prebuilt, FROM scratch, no pull)"
  # `build` pulls nothing unless given --pull (docker-compose 1.x and Compose
  # v2 alike); the prebuilt stage is FROM scratch, which is never pulled.
  "${COMPOSE[@]}" build kvraft1 >/dev/null
  docker image inspect "$KVRAFT_IMAGE" >/dev/null || fail "image $KVRAFT_IMAGE was not built"
fi
user="$(docker image inspect -f '{{.Config.User}}' "$KVRAFT_IMAGE")"
size="$(docker image inspect -f '{{.Size}}' "$KVRAFT_IMAGE")"
[ "$user" = "10001:10001" ] || fail "image user is '$user', expected 10001:10001"
echo "   image $KVRAFT_IMAGE: user $user, $((size / 1024 / 1024)) MiB"
# Two stripped static binaries are about 30 MiB; unstripped they are over 150.
[ "$size" -lt $((64 * 1024 * 1024)) ] || fail "image $KVRAFT_IMAGE is $((size / 1024 / 1024)) MiB: are the binaries stripped?"

step "starting kvraft1..3 (host ports ${P[1]} ${P[2]} ${P[3]}); the certs service runs first"
"${COMPOSE[@]}" up -d --no-build kvraft1 kvraft2 kvraft3

# ------------------------------------------------------------- helpers ----
cid() { "${COMPOSE[@]}" ps -q "kvraft$1"; }

# Every CLI call goes over TLS as the admin identity, with files copied out
# of the certificate volume as a user would (docker-compose.yml's header).
# The CLI would also read KVRAFT_CACERT/CERT/KEY: keep the caller's out of it.
unset KVRAFT_CACERT KVRAFT_CERT KVRAFT_KEY KVRAFT_SERVER_NAME
CERTS="$TMP/certs"
kv() { "$KVRAFT" --cacert "$CERTS/ca.pem" --cert "$CERTS/client-admin.pem" --key "$CERTS/client-admin.key" "$@"; }

# The id of the leader as seen through the given endpoints; empty if none.
leader_via() {
  kv --endpoints "$1" --timeout 3s members 2>/dev/null | awk '$2 == "leader" { print $1; exit }'
}

wait_for_leader() { # endpoints, seconds, [id that doesn't count]
  local i leader
  for ((i = 0; i < $2; i++)); do
    leader="$(leader_via "$1")"
    if [ -n "$leader" ] && [ "$leader" != "${3:-}" ]; then
      echo "$leader"
      return 0
    fi
    sleep 1
  done
  return 1
}

wait_healthy() { # node, seconds
  local i status
  for ((i = 0; i < $2; i++)); do
    status="$(docker inspect -f '{{.State.Health.Status}}' "$(cid "$1")" 2>/dev/null || true)"
    [ "$status" = healthy ] && return 0
    sleep 1
  done
  fail "kvraft$1 is not healthy after $2 s (docker health status: '${status:-none}')"
}

set_via() { # node, key, value
  kv --endpoints "${P[$1]}" --timeout 15s set "$2" "$3" >/dev/null ||
    fail "set $2=$3 through kvraft$1 (${P[$1]}) failed"
}

expect_get() { # node, key, value, [--serializable]
  local got flags=()
  [ -z "${4:-}" ] || flags=("$4")
  got="$(kv --endpoints "${P[$1]}" --timeout 15s "${flags[@]}" get "$2")" ||
    fail "get $2 ${4:-} through kvraft$1 (${P[$1]}) failed"
  [ "$got" = "$3" ] || fail "get $2 ${4:-} through kvraft$1 returned '$got', expected '$3'"
}

# ----------------------------------------------------------------- test ----
step "certificates: the certs service's volume, copied out of kvraft1"
certs_cid="$("${COMPOSE[@]}" ps -q certs)"
certs_rc="$(docker inspect -f '{{.State.ExitCode}}' "$certs_cid")"
[ "$certs_rc" = 0 ] || fail "the certs service exited with $certs_rc"
docker cp "$(cid 1)":/certs "$CERTS" >/dev/null
# Owners and modes as they are in the volume: from docker cp's tar stream
# (a copy on disk is the caller's).
docker cp "$(cid 1)":/certs - | tar -tvf - --numeric-owner >"$TMP/certs.list"
mode_owner() { awk -v f="$1" '$6 == f { print $1, $2 }' "$TMP/certs.list"; }
got="$(mode_owner certs/)"
[ "$got" = "drwx------ 10001/10001" ] || fail "the certificate volume is '$got', expected 'drwx------ 10001/10001'"
for f in ca.key node-1.key node-2.key node-3.key client-admin.key client-reader.key; do
  got="$(mode_owner "certs/$f")"
  [ "$got" = "-rw------- 10001/10001" ] || fail "$f in the volume is '$got', expected '-rw------- 10001/10001'"
done
for f in ca.pem node-1.pem client-admin.pem client-reader.pem; do
  [ -s "$CERTS/$f" ] || fail "the certificate volume has no $f"
done
echo "   certs exited 0; the volume is 0700 uid 10001, its keys 0600 uid 10001"

step "waiting for a leader"
leader="$(wait_for_leader "$ALL" 60)" || fail "no leader after 60 s"
echo "   leader: node $leader"
kv --endpoints "$ALL" members

step "waiting for the containers' HEALTHCHECK (kvraft ping over TLS as reader)"
for n in 1 2 3; do wait_healthy "$n" 60; done
echo "   all three healthy"
for n in 1 2 3; do
  if "${COMPOSE[@]}" logs --no-color "kvraft$n" 2>&1 | grep -q 'peer TLS is off'; then
    fail "kvraft$n says peer TLS is off"
  fi
done
echo "   peer TLS on (no node warns that it is off; the cluster formed over it)"

step "TLS: a client without TLS is refused; reader reads but can't write"
set +e
out="$("$KVRAFT" --endpoints "${P[1]}" --timeout 5s ping 2>&1)"
rc=$?
set -e
[ "$rc" = 2 ] || fail "a plaintext ping exited $rc, expected 2: $out"
grep -q 'TLS' <<<"$out" || fail "a plaintext ping was refused without mentioning TLS: $out"
echo "   plaintext client: exit 2: $out"
reader=(--cacert "$CERTS/ca.pem" --cert "$CERTS/client-reader.pem" --key "$CERTS/client-reader.key")
kv --endpoints "$ALL" --timeout 15s set tls-check by-admin >/dev/null || fail "admin could not write"
got="$("$KVRAFT" "${reader[@]}" --endpoints "$ALL" --timeout 15s get tls-check)" || fail "reader could not read"
[ "$got" = by-admin ] || fail "reader read '$got', expected by-admin"
set +e
out="$("$KVRAFT" "${reader[@]}" --endpoints "$ALL" --timeout 15s set tls-check by-reader 2>&1)"
rc=$?
set -e
[ "$rc" = 5 ] || fail "reader's set exited $rc, expected 5 (permission denied): $out"
got="$(kv --endpoints "$ALL" --timeout 15s get tls-check)"
[ "$got" = by-admin ] || fail "the refused write changed the value to '$got'"
echo "   reader: get OK; set: exit 5: $out"

command -v curl >/dev/null || fail "curl is needed for the metrics endpoints (apt-get install curl)"
step "metrics endpoints (metrics_addr 0.0.0.0:9379, published on ${M[1]} ${M[2]} ${M[3]})"
for n in 1 2 3; do
  curl -fsS --max-time 5 "http://${M[$n]}/health" >/dev/null || fail "GET /health on kvraft$n (${M[$n]}) failed"
  curl -fsS --max-time 5 "http://${M[$n]}/ready" >/dev/null || fail "GET /ready on kvraft$n (${M[$n]}) failed"
  metrics="$(curl -fsS --max-time 5 "http://${M[$n]}/metrics")" || fail "GET /metrics on kvraft$n (${M[$n]}) failed"
  grep -q '^kvraft_has_leader' <<<"$metrics" || fail "GET /metrics on kvraft$n (${M[$n]}) has no kvraft_has_leader"
done
echo "   /health, /ready and /metrics answer on all three"

step "set through each node, get through every node"
for n in 1 2 3; do
  set_via "$n" "key$n" "value$n"
done
for n in 1 2 3; do
  for k in 1 2 3; do expect_get "$n" "key$k" "value$k"; done
done
echo "   9 linearizable reads returned the written values"

victim="$leader"
others=()
for n in 1 2 3; do [ "$n" = "$victim" ] || others+=("$n"); done
step "docker kill kvraft$victim (the leader); the others go on"
docker kill "$(cid "$victim")" >/dev/null
new_leader="$(wait_for_leader "${P[${others[0]}]},${P[${others[1]}]}" 30 "$victim")" ||
  fail "no new leader among kvraft${others[0]} and kvraft${others[1]} after 30 s"
echo "   new leader: node $new_leader"
for n in "${others[@]}"; do set_via "$n" "during$n" "kill$n"; done
for n in "${others[@]}"; do
  for k in "${others[@]}"; do expect_get "$n" "during$k" "kill$k"; done
done
set_via "${others[0]}" latest "written-while-$victim-was-down"
expect_get "${others[1]}" latest "written-while-$victim-was-down"
echo "   writes and reads through kvraft${others[0]} and kvraft${others[1]} succeeded"

step "restarting kvraft$victim; it must catch up"
docker start "$(cid "$victim")" >/dev/null
caught_up=0
for ((i = 0; i < 60; i++)); do
  got="$(kv --endpoints "${P[$victim]}" --timeout 3s --serializable get latest 2>/dev/null || true)"
  if [ "$got" = "written-while-$victim-was-down" ]; then
    caught_up=1
    break
  fi
  sleep 1
done
[ "$caught_up" = 1 ] || fail "kvraft$victim did not catch up within 60 s (serializable get latest: '$got')"
echo "   kvraft$victim caught up after ~${i} s (serializable read of its own copy)"
for n in "${others[@]}"; do expect_get "$victim" "during$n" "kill$n" --serializable; done
set_via "$victim" after restart
for n in 1 2 3; do expect_get "$n" after restart; done
wait_healthy "$victim" 60
kv --endpoints "$ALL" members

step "docker-compose up again: the certs service runs again and keeps every file"
"${COMPOSE[@]}" up -d --no-build kvraft1 kvraft2 kvraft3 2>/dev/null
certs_rc="$(docker inspect -f '{{.State.ExitCode}}' "$certs_cid")"
kept="$(docker logs "$certs_cid" 2>/dev/null | grep -c '^kept ' || true)"
[ "$certs_rc" = 0 ] && [ "$kept" -ge 6 ] || fail "the certs service's second run: exit $certs_rc, $kept files kept (expected 6)"
docker cp "$(cid 1)":/certs/ca.pem "$TMP/ca-again.pem" >/dev/null
cmp -s "$CERTS/ca.pem" "$TMP/ca-again.pem" || fail "the second run replaced the CA"
kv --endpoints "$ALL" --timeout 15s get after >/dev/null || fail "get after the second up failed"
echo "   exit 0, all 6 pairs kept, same CA; the cluster still serves"

step "PASS: 3-node compose cluster formed over TLS (certificates from the certs service), refused a plaintext client and a write by reader, served reads and writes through every node, survived docker kill of the leader, and the restarted node caught up"
