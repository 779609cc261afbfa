#!/bin/sh
# The README's test command. Installs what the tests need but cargo doesn't
# bring, on Debian or Ubuntu when run as root (Prometheus and promtool for the
# observability tests, nix-bin for the Nix evaluation), then runs the whole
# suite: cargo test --locked, with any extra arguments passed on.
#
# (Debian's prometheus package may start its own service; the tests run their
# own Prometheus on a free port and don't need it.)
#
# No test skips silently: without a tool its tests fail, unless the skip is
# asked for with KVRAFT_SKIP_PROMETHEUS=1 or KVRAFT_SKIP_NIX=1.
set -eu
cd "$(dirname "$0")/.."

need=""
# jemalloc (kvraftd's allocator) is built from C by its crate.
command -v make >/dev/null || need="$need make"
command -v cc >/dev/null || need="$need gcc"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    [ "${KVRAFT_SKIP_PROMETHEUS:-0}" = 1 ] || need="$need prometheus"
fi
if ! command -v nix-instantiate >/dev/null; then
    [ "${KVRAFT_SKIP_NIX:-0}" = 1 ] || need="$need nix-bin"
fi
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing:$need (Debian packages)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086 # one word per package
        apt-get install -y -qq $need >/dev/null
    else
        echo "scripts/test.sh: the tests need:$need. Install them (Debian: sudo apt-get install$need)," >&2
        echo "or skip those tests on purpose with KVRAFT_SKIP_PROMETHEUS=1 / KVRAFT_SKIP_NIX=1." >&2
        exit 2
    fi
fi
exec cargo test --locked "$@"
