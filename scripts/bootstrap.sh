#!/bin/sh
# Stand up a kvraft cluster one node at a time: the first member (the seed)
# runs a one-node cluster (started with no --initial-cluster, or with one that
# names only itself); every other member runs `kvraftd --join` with an empty
# data dir. For each of them, in order, this script waits until it is
# reachable, adds it with `kvraft add-node`, and waits until it is a caught-up
# voter before moving on. Re-running it against a formed cluster changes
# nothing and exits 0.
#
# usage: bootstrap.sh [-t SECONDS] [-c CA -C CERT -k KEY [-s NAME]] ID=PEER_ADDR=CLIENT_ADDR ...
#   e.g. bootstrap.sh 1=10.0.0.1:7380=10.0.0.1:7379 2=10.0.0.2:7380=10.0.0.2:7379 3=...
#   -t SECONDS  how long each step may take (default 60, or $BOOTSTRAP_TIMEOUT)
#   -c CA       TLS: the CA certificate that signed the nodes' (kvraft --cacert)
#   -C CERT     TLS: a client certificate (kvraft --cert); its identity needs
#               the admin role when client_roles is set (add-node)
#   -k KEY      TLS: the key of CERT (kvraft --key)
#   -s NAME     TLS: check the nodes' certificates against NAME instead of the
#               CLIENT_ADDR hosts (kvraft --server-name)
#   $KVRAFT     the kvraft CLI to use (default: kvraft on PATH)
#
# TLS settings reach every kvraft call as the CLI's own environment variables
# KVRAFT_CACERT, KVRAFT_CERT, KVRAFT_KEY and KVRAFT_SERVER_NAME: the options
# above set them, and when they are already exported they pass through as is.
#
# Only the kvraft CLI and POSIX tools are used. Exit status: 0 when every
# member is a voter, 1 when a step timed out or failed (including a TLS
# problem the CLI reports), 2 on usage errors.
set -eu

KVRAFT=${KVRAFT:-kvraft}
TIMEOUT=${BOOTSTRAP_TIMEOUT:-60}

log() { printf '%s bootstrap: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
usage() {
    printf 'usage: %s [-t SECONDS] [-c CA -C CERT -k KEY [-s NAME]] ID=PEER_ADDR=CLIENT_ADDR ...\n' "$0" >&2
    printf '  (TLS: -c/-C/-k/-s, or KVRAFT_CACERT/KVRAFT_CERT/KVRAFT_KEY/KVRAFT_SERVER_NAME in the environment)\n' >&2
    exit 2
}

# The CLI reads these variables itself, so exporting them covers every call.
while getopts t:c:C:k:s: opt; do
    case $opt in
        t) TIMEOUT=$OPTARG ;;
        c) KVRAFT_CACERT=$OPTARG; export KVRAFT_CACERT ;;
        C) KVRAFT_CERT=$OPTARG; export KVRAFT_CERT ;;
        k) KVRAFT_KEY=$OPTARG; export KVRAFT_KEY ;;
        s) KVRAFT_SERVER_NAME=$OPTARG; export KVRAFT_SERVER_NAME ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
case $TIMEOUT in ''|*[!0-9]*) log "-t wants a whole number of seconds, got '$TIMEOUT'"; exit 2 ;; esac
# Before anything else: without the CLI every step would fail, and the
# first failure would blame the seed node.
command -v "$KVRAFT" >/dev/null 2>&1 || {
    log "the kvraft CLI ('$KVRAFT') was not found: put it on PATH or set KVRAFT=/path/to/kvraft"
    exit 2
}
for file in ${KVRAFT_CACERT:+"$KVRAFT_CACERT"} ${KVRAFT_CERT:+"$KVRAFT_CERT"} ${KVRAFT_KEY:+"$KVRAFT_KEY"}; do
    [ -r "$file" ] || { log "TLS file '$file' is not readable"; exit 2; }
done

for member in "$@"; do
    case $member in
        *=*:*=*:*) ;;
        *) log "member '$member' is not ID=PEER_ADDR=CLIENT_ADDR"; exit 2 ;;
    esac
    id=${member%%=*}
    case $id in ''|*[!0-9]*|0) log "member '$member': the id must be a positive integer"; exit 2 ;; esac
done

id_of() { printf '%s' "${1%%=*}"; }
peer_of() { rest=${1#*=}; printf '%s' "${rest%%=*}"; }
client_of() { rest=${1#*=}; printf '%s' "${rest#*=}"; }

# The client addresses of the members known to be in the cluster so far.
ENDPOINTS=$(client_of "$1")

# role ID: leader, voter, learner, or nothing when not a member. Reads the
# `kvraft members` table (ID ROLE PEER CLIENT).
role() {
    "$KVRAFT" --endpoints "$ENDPOINTS" --timeout 3s members 2>/dev/null |
        awk -v id="$1" 'NR > 1 && $1 == id { print $2 }'
}

# field NAME ENDPOINT: a number from the `kvraft info` text output.
field() {
    "$KVRAFT" --endpoints "$2" --timeout 3s info 2>/dev/null |
        awk -v name="$1" 'NR == 2 { for (i = 1; i < NF; i++) if ($i == name) print $(i + 1) }'
}

# wait_for DESCRIPTION HINT COMMAND...: retries COMMAND once a second until
# it succeeds or TIMEOUT seconds have passed (by the clock: one try of a
# command can itself take seconds).
wait_for() {
    what=$1 hint=$2
    shift 2
    started=$(date +%s)
    until "$@"; do
        [ $(($(date +%s) - started)) -lt "$TIMEOUT" ] || fail "$what: not done after ${TIMEOUT}s; $hint"
        sleep 1
    done
}

is_voter() { case $(role "$1") in leader|voter) return 0 ;; *) return 1 ;; esac; }
is_member() { [ -n "$(role "$1")" ]; }
# quietly ARGS...: runs the CLI without output. Its exit status 2 (a TLS or
# usage problem, e.g. a node that requires TLS or a wrong CA) won't go away by
# waiting, so it stops the script with the CLI's message.
quietly() {
    rc=0
    err=$("$KVRAFT" "$@" 2>&1 >/dev/null) || rc=$?
    [ "$rc" -ne 2 ] || fail "$err"
    return "$rc"
}
answers() { quietly --endpoints "$1" --timeout 2s ping; }
has_leader() { quietly --endpoints "$ENDPOINTS" --timeout 3s members; }
applied_at_least() { a=$(field applied "$1"); [ -n "$a" ] && [ "$a" -ge "$2" ]; }

seed=$1
shift
seed_id=$(id_of "$seed")
log "seed: node $seed_id at $(client_of "$seed")"
wait_for "seed node $seed_id has a leader" \
    "check that kvraftd --id $seed_id is running with a one-node cluster and listening on $(client_of "$seed")" \
    has_leader
is_voter "$seed_id" || fail "node $seed_id is not a voter of the cluster at $ENDPOINTS; is it the right seed?"

for member in "$@"; do
    id=$(id_of "$member")
    peer=$(peer_of "$member")
    client=$(client_of "$member")
    if is_voter "$id"; then
        log "node $id is already a voter; nothing to do"
        ENDPOINTS="$ENDPOINTS,$client"
        continue
    fi
    log "node $id: waiting until it answers at $client"
    wait_for "node $id reachable at $client" \
        "check that kvraftd --id $id --join is running there with an empty data dir" \
        answers "$client"
    if is_member "$id"; then
        log "node $id is already a learner; waiting for its promotion"
    else
        log "node $id: adding it (peer $peer, client $client)"
        "$KVRAFT" --endpoints "$ENDPOINTS" --timeout "${TIMEOUT}s" add-node "$id" "$peer" --client-addr "$client" >/dev/null ||
            fail "kvraft add-node $id $peer did not succeed (see the error above)"
    fi
    ENDPOINTS="$ENDPOINTS,$client"
    wait_for "node $id promoted to voter" \
        "check that node $id can reach the others' peer ports and they can reach $peer" \
        is_voter "$id"
    target=$(field commit "$(client_of "$seed")")
    target=${target:-0}
    wait_for "node $id caught up to index $target" \
        "check node $id's log; it may still be receiving a large snapshot" \
        applied_at_least "$client" "$target"
    log "node $id is a caught-up voter"
done

log "cluster formed:"
"$KVRAFT" --endpoints "$ENDPOINTS" members >&2
