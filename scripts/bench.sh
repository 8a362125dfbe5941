#!/usr/bin/env bash
# Side-by-side figures from one run, all on stdout:
#   1. the hardware limit: pgbench running our append's INSERT (benches/pgbench),
#   2. the peer: cqrs-es + postgres-es under our command scenarios
#      (benches/peer-cqrs-es),
#   3. ours: `neurectomy-bench append`, `relay` and `project` (the last with a
#      Redis Cluster it starts: scripts/redis-cluster.sh),
#   4. the API: `neurectomy-bench api` (wrk against a spawned `neurectomy serve`,
#      its RSS, 10,000 WebSocket subscriptions); wrk is installed if missing,
#   5. instructions per operation: one command, one relayed event, one event
#      of each projector, one agent(id) request and one delivered
#      subscription message, under valgrind --tool=callgrind (exact and
#      repeatable on a shared machine; CALLGRIND=0 skips it).
# Every scenario also reports what one operation cost: CPU time of the
# process doing the work and of the services (/proc), its context switches
# and CPU migrations (perf stat; linux-perf is installed if missing).
# BUSY=1 runs `stress-ng --cpu 1` beside the whole run (the busy machine).
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
callgrind_seconds="${CALLGRIND_SECONDS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neurectomy/target}"
peer_target="${PEER_CARGO_TARGET_DIR:-$HOME/.cache/neurectomy-peer-target}"
export NEURECTOMY_DATABASE_URL="${NEURECTOMY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/neurectomy}"
export NEURECTOMY_NATS_URL="${NEURECTOMY_NATS_URL:-nats://127.0.0.1:4222}"
export PG_URL="${PG_URL:-${NEURECTOMY_DATABASE_URL%/*}}"

scripts/services.sh up
scripts/graph.sh up

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
ensure_installed() { # <command> <package> <why>
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "[bench] installing $2 ($3)…"
    $sudo apt-get install -y "$2" || { $sudo apt-get update && $sudo apt-get install -y "$2"; }
  fi
}
ensure_installed wrk wrk "HTTP load generator of \`neurectomy-bench api\`"
ensure_installed perf linux-perf "context switches and migrations per operation"
ensure_installed valgrind valgrind "instructions per operation"
if [ "${BUSY:-0}" = 1 ]; then
  ensure_installed stress-ng stress-ng "the busy machine"
fi

echo "[bench] building neurectomy, neurectomy-bench and the peer harness (release)…"
# Each on its own: together, cargo would unify features and the measured
# `neurectomy` would carry the bench's test kits.
cargo build --release --locked -p neurectomy-api
cargo build --release --locked -p neurectomy-bench
CARGO_TARGET_DIR="$peer_target" cargo build --release --locked \
  --manifest-path benches/peer-cqrs-es/Cargo.toml

if [ "${BUSY:-0}" = 1 ]; then
  stress-ng --cpu 1 --quiet &
  stress_pid=$!
  trap 'kill "$stress_pid" 2>/dev/null || true' EXIT
  echo "[bench] busy machine: stress-ng --cpu 1 (pid $stress_pid) runs beside everything"
fi

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
echo "== ours: neurectomy-bench project (replays, freshness, rebuilds by \`project\` processes, freshness on a Redis Cluster)"
# A Redis Cluster of its own for the cluster scenario (three primaries, three
# replicas on 7301-7306), removed at the end.
scripts/redis-cluster.sh up
NEURECTOMY_BENCH_REDIS_CLUSTER=redis://127.0.0.1:7301,redis://127.0.0.1:7302,redis://127.0.0.1:7303 \
  "$CARGO_TARGET_DIR/release/neurectomy-bench" project --seconds "$seconds" --tenants 64
scripts/redis-cluster.sh clean

echo
echo "== ours: neurectomy-bench api"
"$CARGO_TARGET_DIR/release/neurectomy-bench" api --seconds "$seconds"

if [ "${CALLGRIND:-1}" != 0 ]; then
  echo
  echo "== instructions per operation: the same paths under valgrind --tool=callgrind"
  echo "   (${callgrind_seconds}s scenarios; the Ir column; everything else in these tables is slowed ~50× by valgrind)"
  cg_dir="$(mktemp -d)"
  # Under valgrind everything in the measured process is ~50× slower: the
  # timeouts of its calls to the services are raised to match.
  for t in DATABASE_TIMEOUT_MS NATS_TIMEOUT_MS REDIS_CONNECT_TIMEOUT_MS REDIS_TIMEOUT_MS GRAPH_TIMEOUT_MS; do
    export "NEURECTOMY_$t=120000"
  done
  bench="$CARGO_TARGET_DIR/release/neurectomy-bench"
  vg=(valgrind -q --tool=callgrind "--callgrind-out-file=$cg_dir/callgrind.out.%p")
  "${vg[@]}" "$bench" append --seconds "$callgrind_seconds" --only "command: 1 writer"
  "${vg[@]}" "$bench" relay --seconds 1 --only "drain"
  "${vg[@]}" "$bench" project --seconds "$callgrind_seconds" --only "projector catch-up"
  "$bench" api --callgrind "$cg_dir" --seconds "$callgrind_seconds" --runs 1 --only http --subscribers 0
  "$bench" api --callgrind "$cg_dir" --runs 1 --only ws --subscribers 200
  rm -rf "$cg_dir"
fi
