#!/usr/bin/env bash
# The main job on a fresh machine: services up, release build, database
# created and migrated, then `neurectomy all` (relay) in the background and
# `neurectomy simulate` in the foreground so you watch events flow; at the end
# `neurectomy status` shows the relay's and the Redis projection's positions.
# Ctrl-C stops both. Extra arguments go to `neurectomy simulate`
# (e.g. --duration 30 --rate 500).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neurectomy/target}"
export NEURECTOMY_DATABASE_URL="${NEURECTOMY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/neurectomy}"
export NEURECTOMY_NATS_URL="${NEURECTOMY_NATS_URL:-nats://127.0.0.1:4222}"

scripts/services.sh up
scripts/graph.sh up
echo "[run] building neurectomy (release)…" >&2
cargo build --release --locked -p neurectomy-api
bin="$CARGO_TARGET_DIR/release/neurectomy"

"$bin" migrate
mkdir -p .run
"$bin" all > .run/all.log 2>&1 &
all_pid=$!
trap 'kill -TERM "$all_pid" 2>/dev/null || true; wait "$all_pid" 2>/dev/null || true; echo "[run] stopped; relay log in .run/all.log" >&2' EXIT
echo "[run] neurectomy all is running (pid $all_pid, log .run/all.log); starting the simulator — Ctrl-C to stop" >&2
"$bin" simulate "$@" || true
# Give the relay and the projector a moment to catch up, then show where
# everything stands: the log's head, the relay (JetStream) and Redis.
sleep 2
"$bin" status || true
