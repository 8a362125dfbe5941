# syntax=docker/dockerfile:1.7
#
# The `neurectomy` binary in a small, non-root runtime image. One image runs
# every role; the command picks it: `serve` (the API, the default), `relay`,
# `project --only redis|graph`, `migrate`, `simulate`, `status`, `verify`,
# `replay`, `token`. The migrations are compiled into the binary
# (`sqlx::migrate!`), so `migrate` needs nothing beside it.
#
#   docker build -t neurectomy .
#   docker run --rm neurectomy --help
#
# Needs BuildKit (the default builder of current Docker) for the cache mounts:
# the cargo registry and the target directory survive between builds, so a
# rebuild after a source change recompiles only the workspace crates.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p neurectomy-api --bin neurectomy \
    && cp target/release/neurectomy /usr/local/bin/neurectomy

# Same Debian release as the builder, so the binary's glibc matches.
FROM debian:bookworm-slim AS runtime
# ca-certificates unpinned on purpose: it should follow Debian's updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 neurectomy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin neurectomy
COPY --from=builder /usr/local/bin/neurectomy /usr/local/bin/neurectomy
USER 10001:10001
# Inside a container the API must listen beyond loopback (the binary's own
# default is 127.0.0.1:8080, right for a development machine).
ENV NEURECTOMY_API_LISTEN=0.0.0.0:8080
EXPOSE 8080
# No HEALTHCHECK here: only `serve` speaks HTTP, and the image runs every
# role. deploy/compose.yaml checks the API's /healthz itself.
ENTRYPOINT ["neurectomy"]
CMD ["serve"]
