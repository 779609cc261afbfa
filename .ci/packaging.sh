#!/usr/bin/env bash
# CI checks for the packaging (called from .ci/run after the Rust tests):
#   1. the systemd units: `systemd-analyze verify` clean, and
#      `systemd-analyze security` exposure <= 1.5 ("OK") for both units, alone
#      and with their TLS drop-ins (kvraft.service.d/, kvraft@.service.d/);
#   2. every .nix file parses (nix-instantiate --parse; a full `nix build`
#      needs nixpkgs, which this machine can't fetch; tests/nix_packaging.rs
#      evaluates the flake and the module with nixpkgs' lib), and the static
#      binaries below are built from the flake package's source set;
#   3. docker-compose.yml is valid (also with docker-compose.plaintext.yml), and
#      the Prometheus config if promtool is here;
#   4. packaging/systemd/container-test.sh: both units run under a real systemd
#      (PID 1 in a container made with debootstrap): sandbox, notify, watchdog,
#      reload, graceful stop, three template instances, then the TLS drop-ins
#      with certificates from `kvraft certs init` as credentials;
#   5. scripts/compose-e2e.sh: a three-node cluster in Docker from the image's
#      `prebuilt` target (no registry needed), over TLS with certificates from
#      its certs service, with a node killed and restarted.
# Needs root (apt-get), a running Docker engine and docker-compose. Runs in
# about 7 minutes on 2 cores, most of it the static release build and, on a
# machine without the cached rootfs, debootstrap (~2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=1.5
export CARGO_TARGET_DIR="${KVRAFT_STATIC_TARGET_DIR:-/tmp/kvraft-static}"
export CARGO_TERM_COLOR=never
TRIPLE="$(uname -m)-unknown-linux-gnu"
UNITS=(packaging/systemd/kvraft.service packaging/systemd/kvraft@.service
  packaging/systemd/kvraft-backup.service packaging/systemd/kvraft-backup.timer)
DROPINS=(packaging/systemd/kvraft.service.d packaging/systemd/kvraft@.service.d)

section() { echo; echo "== packaging: $*"; }
fail() {
  echo "packaging: FAIL: $*" >&2
  exit 1
}

# ------------------------------------------------------------------ tools --
section "tools"
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v nix-instantiate >/dev/null || need+=(nix-bin)
command -v objcopy >/dev/null || need+=(binutils)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
command -v docker >/dev/null || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "the Docker engine is not running (docker info failed)"
docker-compose version >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 ||
  fail "neither docker-compose nor 'docker compose' is installed"
echo "$(systemd-analyze --version | head -1); $(nix-instantiate --version); $(docker --version)"

# ------------------------------------------------------ static binaries --
# Built from the flake package's own source (nix/source.nix, copied to the
# store by lib.fileset.toSource, evaluated with nixpkgs' lib): proof that the
# set holds everything cargo needs.
NIXPKGS_LIB="${KVRAFT_NIXPKGS_LIB:-$PWD/../shared/vendor/nixpkgs-lib/lib}"
NIX_SRC="$(nix-instantiate --eval --strict --json --read-write-mode tests/nix/eval-flake.nix \
  --arg lib "import $NIXPKGS_LIB" -A package.src | tr -d '"')"
[ -f "$NIX_SRC/Cargo.toml" ] || fail "the flake's source set did not evaluate to a directory ($NIX_SRC)"
section "static release build of kvraftd and kvraft from the Nix source set $NIX_SRC ($TRIPLE, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
(cd "$NIX_SRC" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --release --target "$TRIPLE" --bin kvraftd --bin kvraft)
KVRAFTD="$CARGO_TARGET_DIR/$TRIPLE/release/kvraftd"
"$KVRAFTD" --version

section "the unit's configuration: shipped example config + Environment=KVRAFT_DATA_DIR"
data_dir="$(KVRAFT_DATA_DIR=/var/lib/kvraft "$KVRAFTD" --config packaging/kvraft.example.toml --print-config |
  sed -n 's/^data_dir = "\(.*\)"$/\1/p')"
[ "$data_dir" = /var/lib/kvraft ] || fail "with the unit's environment data_dir is '$data_dir', not /var/lib/kvraft"
echo "data_dir = $data_dir"

# ---------------------------------------------------------------- systemd --
section "systemd units: ${UNITS[*]}"
# verify loads the units as the system manager would, so it needs
# /usr/bin/kvraftd and the units the service depends on: both go into a
# throwaway root (the host is not touched). Both checks run on that root
# (--root), first with the units alone, then with the TLS drop-ins installed
# where their comments say (/etc/systemd/system/UNIT.d/). (Given a unit file's
# path instead, systemd-analyze would also apply the UNIT.d/ next to it.)
sysroot="$(mktemp -d)"
trap 'rm -rf "$sysroot"' EXIT
mkdir -p "$sysroot/usr/bin" "$sysroot/bin" "$sysroot/etc/systemd/system" "$sysroot/usr/lib/systemd"
if [ -d /usr/lib/systemd/system ]; then
  cp -a /usr/lib/systemd/system "$sysroot/usr/lib/systemd/"
else
  cp -a /lib/systemd/system "$sysroot/usr/lib/systemd/"
fi
install -m 0755 "$KVRAFTD" "$sysroot/usr/bin/kvraftd"
install -m 0755 "$CARGO_TARGET_DIR/$TRIPLE/release/kvraft" "$sysroot/usr/bin/kvraft"
# ExecReload's /bin/kill: procps' if there is one, else any executable.
install -m 0755 "$(type -P kill || type -P true)" "$sysroot/bin/kill"
cp "${UNITS[@]}" "$sysroot/etc/systemd/system/"

# verify exits 0 on some problems (unknown keys, bad values are "ignored"
# with a message), so any output at all is a failure.
verify_clean() { # what
  local out rc
  set +e
  out="$(systemd-analyze verify --root="$sysroot" kvraft.service kvraft@node1.service kvraft-backup.service kvraft-backup.timer 2>&1)"
  rc=$?
  set -e
  if [ "$rc" != 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify $1: exit $rc, output above"
  fi
  echo "verify: clean (no output, exit 0) for kvraft.service, kvraft@node1.service and kvraft-backup.{service,timer} $1"
}

check_exposure() { # unit, what
  local out line score
  out="$(systemd-analyze security --offline=true --root="$sysroot" --no-pager "$1" 2>&1)" || {
    printf '%s\n' "$out" >&2
    fail "systemd-analyze security $1 $2 failed"
  }
  line="$(printf '%s\n' "$out" | grep 'Overall exposure level' || true)"
  score="$(printf '%s\n' "$line" | sed -n 's/.*: \([0-9][0-9.]*\) .*/\1/p')"
  [ -n "$score" ] || {
    printf '%s\n' "$out" >&2
    fail "no exposure level in the output for $1 $2"
  }
  echo "security $2: $line"
  awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' || {
    printf '%s\n' "$out" >&2
    fail "$1 $2: exposure $score is above $MAX_EXPOSURE; the unit lost some hardening (the full table above lists every item)"
  }
}

section "systemd-analyze verify and security --offline=true (fail above $MAX_EXPOSURE): the units alone"
verify_clean "(units alone)"
check_exposure kvraft.service "(unit alone)"
check_exposure kvraft@node1.service "(unit alone)"
check_exposure kvraft-backup.service "(unit alone)"

section "systemd-analyze verify and security --offline=true (fail above $MAX_EXPOSURE): with the TLS drop-ins"
cp -r "${DROPINS[@]}" "$sysroot/etc/systemd/system/"
verify_clean "(with kvraft.service.d/tls.conf, kvraft@.service.d/tls.conf)"
check_exposure kvraft.service "(with kvraft.service.d/tls.conf)"
check_exposure kvraft@node1.service "(with kvraft@.service.d/tls.conf)"

# -------------------------------------------------------------------- nix --
section "nix-instantiate --parse on every .nix file"
mapfile -t nix_files < <(find . -name '*.nix' -not -path './target/*' -not -path './.git/*' | sort)
[ "${#nix_files[@]}" -gt 0 ] || fail "no .nix files found"
for f in "${nix_files[@]}"; do
  nix-instantiate --parse "$f" >/dev/null || fail "$f does not parse"
  echo "parses: $f"
done

# ---------------------------------------------------------------- compose --
section "docker-compose.yml"
if docker-compose version >/dev/null 2>&1; then COMPOSE=(docker-compose); else COMPOSE=(docker compose); fi
"${COMPOSE[@]}" -f docker-compose.yml config -q
# Rendered into a variable first: `config | grep -q` under pipefail fails
# whenever grep exits before docker-compose has written everything (SIGPIPE).
rendered="$(KVRAFT_DOCKER_TARGET=prebuilt "${COMPOSE[@]}" -f docker-compose.yml config)"
grep -q 'target: prebuilt' <<<"$rendered" ||
  fail "KVRAFT_DOCKER_TARGET=prebuilt does not select the prebuilt target"
"${COMPOSE[@]}" -f docker-compose.yml --profile monitoring config -q
"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.plaintext.yml config -q
rendered="$("${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.plaintext.yml config)"
grep -q 'KVRAFT_CERT_FILE: /certs' <<<"$rendered" &&
  fail "docker-compose.plaintext.yml does not unset KVRAFT_CERT_FILE"
echo "valid (default, KVRAFT_DOCKER_TARGET=prebuilt, --profile monitoring, + docker-compose.plaintext.yml)"
echo "the monitoring profile (Prometheus, Grafana images) is not started here: no registry to pull them from"

if command -v promtool >/dev/null && [ -f packaging/prometheus/alerts.yml ]; then
  promdir="$(mktemp -d)"
  cp packaging/prometheus/alerts.yml "$promdir/alerts.yml"
  sed "s#/etc/prometheus/alerts.yml#$promdir/alerts.yml#" packaging/prometheus/prometheus-compose.yml >"$promdir/prometheus.yml"
  promtool check config "$promdir/prometheus.yml"
  rm -rf "$promdir"
else
  echo "promtool or packaging/prometheus/alerts.yml absent: prometheus-compose.yml not checked with promtool"
fi

# ------------------------------------------------------ systemd for real --
section "packaging/systemd/container-test.sh: the units under a real systemd"
bash packaging/systemd/container-test.sh "$KVRAFTD" "$CARGO_TARGET_DIR/$TRIPLE/release/kvraft"

# ------------------------------------------------------------- e2e run --
section "scripts/compose-e2e.sh"
bash scripts/compose-e2e.sh

section "all packaging checks passed"
