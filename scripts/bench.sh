#!/usr/bin/env bash
# Side-by-side figures from one run, all on stdout:
#   1. the hardware limit: pgbench running our append's INSERT (benches/pgbench),
#   2. the peer: cqrs-es + postgres-es under our command scenarios
#      (benches/peer-cqrs-es),
#   3. ours: `neurectomy-bench append` and `neurectomy-bench relay`,
#   4. the API: `neurectomy-bench api` (wrk against a spawned `neurectomy serve`,
#      its RSS, 10,000 WebSocket subscriptions); wrk is installed if missing.
# The benchmarks are their own binary (benches/neurectomy-bench), built next
# to `neurectomy`, which `neurectomy-bench api` spawns.
# Everything is built first, so no build competes with a measurement. Each
# part creates its own scratch database and drops it.
#
#   SECONDS_PER_SCENARIO=15 scripts/bench.sh
#
# CARGO_TARGET_DIR (ours) defaults to $HOME/.cache/neurectomy/target and
# PEER_CARGO_TARGET_DIR (the peer) to $HOME/.cache/neurectomy-peer-target.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 2>&1

seconds="${SECONDS_PER_SCENARIO:-15}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neurectomy/target}"
peer_target="${PEER_CARGO_TARGET_DIR:-$HOME/.cache/neurectomy-peer-target}"
export NEURECTOMY_DATABASE_URL="${NEURECTOMY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/neurectomy}"
export NEURECTOMY_NATS_URL="${NEURECTOMY_NATS_URL:-nats://127.0.0.1:4222}"
export PG_URL="${PG_URL:-${NEURECTOMY_DATABASE_URL%/*}}"

scripts/services.sh up
scripts/graph.sh up

if ! command -v wrk >/dev/null 2>&1; then
  echo "[bench] installing wrk (HTTP load generator of \`neurectomy-bench api\`)…"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get install -y wrk || { $sudo apt-get update && $sudo apt-get install -y wrk; }
fi

echo "[bench] building neurectomy, neurectomy-bench and the peer harness (release)…"
# Each on its own: together, cargo would unify features and the measured
# `neurectomy` would carry the bench's test kits.
cargo build --release --locked -p neurectomy-api
cargo build --release --locked -p neurectomy-bench
CARGO_TARGET_DIR="$peer_target" cargo build --release --locked \
  --manifest-path benches/peer-cqrs-es/Cargo.toml

echo
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
  "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), ${seconds}s per scenario"

echo
echo "== limit: pgbench, our INSERT on our schema"
benches/pgbench/run.sh "$seconds"

echo
echo "== peer: cqrs-es + postgres-es"
"$peer_target/release/peer-cqrs-es" --seconds "$seconds"

echo
echo "== ours: neurectomy-bench append"
"$CARGO_TARGET_DIR/release/neurectomy-bench" append --seconds "$seconds"

echo
echo "== ours: neurectomy-bench relay"
"$CARGO_TARGET_DIR/release/neurectomy-bench" relay --seconds "$seconds"

echo
echo "== ours: neurectomy-bench api"
"$CARGO_TARGET_DIR/release/neurectomy-bench" api --seconds "$seconds"
