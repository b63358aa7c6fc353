# syntax=docker/dockerfile:1
#
# Sluice container image: a release build in a Rust image, then only the
# binary and a default configuration on a distroless base (glibc and
# libgcc, no shell, no package manager), running as an unprivileged user.
#
#   docker build -t sluice:0.1.0 .
#   docker run --rm --stop-timeout 30 -p 8080:8080 -p 9901:9901 \
#       -v "$PWD/my-sluice.toml:/etc/sluice/sluice.toml:ro" sluice:0.1.0
#
# deploy/README.md has the details (size, configuration, shutdown).

# The builder uses the toolchain CI uses; its Debian release matches the
# runtime's, so the binary's glibc is the one it runs on.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Keep function names for panic backtraces, drop the rest of the debug info.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && install -D -m 0755 target/release/sluice /out/sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/sluice /usr/local/bin/sluice
COPY deploy/docker/sluice.toml /etc/sluice/sluice.toml
# `sluice run` reads SLUICE_CONFIG unless --config is given.
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml
# A numeric user, so Kubernetes can verify runAsNonRoot.
USER 65532:65532
# Proxy listener and admin endpoints (/healthz /readyz /metrics /status).
EXPOSE 8080 9901
# SIGTERM starts the graceful shutdown: /readyz turns 503, the listeners
# keep accepting for shutdown.drain_delay, in-flight requests get
# shutdown.grace, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run"]
