#!/usr/bin/env bash
# The whole test suite against the real services (PostgreSQL, NATS JetStream,
# Redis, and a Bolt graph server: ArcadeDB via scripts/graph.sh): starts what
# is missing, installs ArcadeDB for the fault tests' private graph servers
# and what the JavaScript clients of the tests need (scripts/js.sh:
# tests/js's packages, Debian's Chromium), then runs every crate's unit,
# property, integration and end-to-end tests.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neurectomy/target}"
scripts/services.sh up
scripts/graph.sh up
scripts/graph.sh install >/dev/null # the fault tests start private ArcadeDB servers
scripts/js.sh up
cargo test --workspace --locked "$@"
