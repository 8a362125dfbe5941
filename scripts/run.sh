#!/usr/bin/env bash
# The main job on a fresh machine: services up, release build, database
# created and migrated, then `neurectomy all --simulate` (API, relay,
# projectors and a gentle simulated workload in one process). When the API
# is ready it prints a token, a sample query and the GraphiQL address, and
# keeps serving until Ctrl-C. Extra arguments go to `neurectomy all`
# (e.g. --rate 200 --duration 60 for the simulator).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neurectomy/target}"
export NEURECTOMY_DATABASE_URL="${NEURECTOMY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/neurectomy}"
export NEURECTOMY_NATS_URL="${NEURECTOMY_NATS_URL:-nats://127.0.0.1:4222}"
export NEURECTOMY_API_LISTEN="${NEURECTOMY_API_LISTEN:-127.0.0.1:8080}"
export NEURECTOMY_SIM_RATE="${NEURECTOMY_SIM_RATE:-20}"
export NEURECTOMY_SIM_TENANT="${NEURECTOMY_SIM_TENANT:-demo}"

scripts/services.sh up
# The graph server's one-time install and start overlap the build.
graph_log="$(mktemp)"
scripts/graph.sh up > "$graph_log" 2>&1 &
graph_up=$!
echo "[run] building neurectomy (profile quick-release: optimised, no whole-program LTO)…" >&2
cargo build --profile quick-release --locked -p neurectomy-api
bin="$CARGO_TARGET_DIR/quick-release/neurectomy"
if ! wait "$graph_up"; then
  cat "$graph_log" >&2
  echo "[run] the graph server did not start (scripts/graph.sh up); see above" >&2
  exit 1
fi
rm -f "$graph_log"

mkdir -p .run
# A development signing secret, made once per checkout (production sets
# NEURECTOMY_JWT_SECRET or NEURECTOMY_JWT_PUBLIC_KEY itself).
if [ -z "${NEURECTOMY_JWT_SECRET:-}" ]; then
  if [ ! -s .run/jwt-secret ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > .run/jwt-secret)
  fi
  NEURECTOMY_JWT_SECRET="$(cat .run/jwt-secret)"
  export NEURECTOMY_JWT_SECRET
fi

"$bin" migrate
# In a session of its own: Ctrl-C (SIGINT to the terminal's process group)
# reaches only this script, whose exit trap forwards exactly one SIGTERM, so
# the process shuts down gracefully (a second signal would force it out).
setsid "$bin" all --simulate "$@" > .run/all.log 2>&1 &
all_pid=$!
trap 'kill -TERM "$all_pid" 2>/dev/null || true; wait "$all_pid" 2>/dev/null || true; echo "[run] stopped; log in .run/all.log" >&2' EXIT

base="http://$NEURECTOMY_API_LISTEN"
for _ in $(seq 1 120); do
  if curl -fsS "$base/readyz" > /dev/null 2>&1; then break; fi
  if ! kill -0 "$all_pid" 2>/dev/null; then
    echo "[run] neurectomy all exited; the end of .run/all.log:" >&2
    tail -n 20 .run/all.log >&2
    exit 1
  fi
  sleep 0.5
done
curl -fsS "$base/readyz" > /dev/null || { echo "[run] the API did not become ready; see .run/all.log" >&2; exit 1; }

token="$("$bin" token --tenant "$NEURECTOMY_SIM_TENANT" --role operator,auditor)"
echo "$token" > .run/token
cat <<MSG

[run] Neurectomy is serving (API, relay, projectors and a simulator at $NEURECTOMY_SIM_RATE commands/s; log .run/all.log).

  GraphiQL:      $base/?token=$token
                 (the token is filled in for queries, mutations and subscriptions)
  GraphQL:       $base/graphql      WebSocket: ws://$NEURECTOMY_API_LISTEN/graphql/ws
  Token (tenant $NEURECTOMY_SIM_TENANT, operator + auditor; also in .run/token):

$token

  Try:
  curl -s $base/graphql -H "Authorization: Bearer \$(cat .run/token)" -H 'Content-Type: application/json' \\
       -d '{"query":"{ agents(first: 3) { edges { node { id name status capabilities } } } projectionStatus { name lag } }"}'

MSG
curl -s "$base/graphql" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"query":"{ agents(first: 3) { edges { node { id name status capabilities } } } projectionStatus { name lag } }"}'
echo
echo "[run] Ctrl-C stops everything." >&2
wait "$all_pid"
