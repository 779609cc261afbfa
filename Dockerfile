# kvraft image: statically linked kvraftd and kvraft in an otherwise empty
# image (FROM scratch), running as uid 10001, data in the volume /var/lib/kvraft.
#
# Two targets, one image layout:
#   runtime  (default, last stage)  builds the binaries in a Rust image:
#            docker build -t kvraft .          (or: docker-compose up --build)
#   prebuilt  copies binaries built on the host from packaging/docker/prebuilt/,
#            for machines without a container registry (nothing is pulled:
#            FROM scratch needs no image):
#            scripts/compose-e2e.sh does it, or by hand:
#              RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
#              install -s -m 0755 target/x86_64-unknown-linux-gnu/release/kvraft{d,} packaging/docker/prebuilt/usr/bin/
#              chmod 0700 packaging/docker/prebuilt/var/lib/kvraft
#              docker build --target prebuilt -t kvraft .
#
# The `base` and `prebuilt` stages come first on purpose: the classic builder (no
# BuildKit) runs every stage up to the target in file order, so a target after
# the Rust stage would try to pull the Rust image. On the default target the
# classic builder also runs this stage; its directories always exist (tracked
# placeholders), so it costs nothing.
#
# No "# syntax=" line and no RUN --mount: both need BuildKit or a pull.

ARG RUST_IMAGE=rust:1-bookworm

# -------------------------------------------------------------------- base --
# What both final images share: users, the runtime settings, the volume and
# the health check. A local stage, so nothing is pulled.
FROM scratch AS base
COPY packaging/docker/etc/ /etc/
# Listen on every interface of the container: clients 7379, peers 7380,
# /metrics /health /ready 9379. Listening on 0.0.0.0 requires the advertise
# addresses (KVRAFT_ADVERTISE_CLIENT_ADDR / _PEER_ADDR or the flags).
ENV KVRAFT_DATA_DIR=/var/lib/kvraft \
    KVRAFT_CLIENT_ADDR=0.0.0.0:7379 \
    KVRAFT_PEER_ADDR=0.0.0.0:7380 \
    KVRAFT_METRICS_ADDR=0.0.0.0:9379
EXPOSE 7379 7380 9379
# Up = the node answers on its client port (a node without a leader still
# answers: readiness does not wait for a leader, as under systemd). With TLS on
# that port, the container's KVRAFT_CACERT, KVRAFT_CERT and KVRAFT_KEY give the
# CLI its CA and client certificate (docker-compose.yml sets them).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/usr/bin/kvraft", "--endpoints", "127.0.0.1:7379", "--timeout", "3s", "ping"]
# Graceful stop on SIGTERM: leadership handover and a final snapshot within
# shutdown_timeout_ms (10 s); give it `--stop-timeout 30` / stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/kvraftd"]

# ---------------------------------------------------------------- prebuilt --
FROM base AS prebuilt
COPY packaging/docker/prebuilt/usr/ /usr/
# Copying var/ (not var/lib/kvraft/) keeps the directory's mode 0700; a named
# volume mounted there takes this owner and mode when it is first created.
COPY --chown=10001:10001 packaging/docker/prebuilt/var/ /var/
USER 10001:10001
VOLUME ["/var/lib/kvraft"]

# ----------------------------------------------------------------- builder --
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# crt-static: one static binary per program, no libc in the image. glibc
# warns that getaddrinfo in a static binary needs the shared NSS libraries at
# run time; see docker-compose.yml for what that means for peer names.
RUN set -eux; \
    target="$(uname -m)-unknown-linux-gnu"; \
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --release --target "$target" --bin kvraftd --bin kvraft; \
    mkdir -p /out/usr/bin /out/var/lib/kvraft; \
    for bin in kvraftd kvraft; do \
        objcopy --strip-debug "target/$target/release/$bin" "/out/usr/bin/$bin"; \
        chmod 0755 "/out/usr/bin/$bin"; \
    done; \
    chmod 0700 /out/var/lib/kvraft; \
    /out/usr/bin/kvraftd --version

# ----------------------------------------------------------------- runtime --
FROM base AS runtime
COPY --from=builder /out/usr/ /usr/
COPY --from=builder --chown=10001:10001 /out/var/ /var/
USER 10001:10001
VOLUME ["/var/lib/kvraft"]
