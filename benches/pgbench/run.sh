#!/usr/bin/env bash
# The hardware limit for our event store: pgbench running the INSERT our
# append does (insert.sql: one event per transaction; insert10.sql: ten) on
# our real schema, in a scratch database that is dropped afterwards.
#
#   benches/pgbench/run.sh [seconds]        # default: $SECONDS_PER_SCENARIO or 15
#
# PG_URL (default postgres://postgres@127.0.0.1:5432) names the server.
# Prepared statements (-M prepared), as sqlx uses. p50/p99 come from pgbench's
# per-transaction log.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
seconds="${1:-${SECONDS_PER_SCENARIO:-15}}"
base="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
db="pgbench_limit_$(date +%s)_$$"
url="$base/$db"
logs="$(mktemp -d)"

command -v pgbench >/dev/null || {
  echo "[pgbench] pgbench is missing: apt-get install postgresql-contrib (or postgresql-client)" >&2
  exit 1
}

cleanup() {
  psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 ||
    echo "[pgbench] could not drop $db" >&2
  rm -rf "$logs"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$base/postgres" -c "CREATE DATABASE $db" >/dev/null
for migration in "$here"/../../migrations/*.sql; do
  psql -q -v ON_ERROR_STOP=1 "$url" -f "$migration" >/dev/null
done
echo "[pgbench] $(pgbench --version), ${seconds}s per scenario, scratch database $db" >&2

results=()
# scenario name, events per transaction, pgbench arguments…
bench() {
  local name="$1" events="$2"
  shift 2
  local prefix="$logs/$(echo "$name" | tr -c 'a-z0-9' '_')"
  echo "[pgbench] running \`$name\` for ${seconds}s…" >&2
  local out
  out="$(pgbench -n -M prepared -T "$seconds" -l --log-prefix="$prefix" "$@" "$url" 2>&1)" || {
    echo "$out" >&2
    return 1
  }
  local tps avg failed p50 p99
  tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -n 1)"
  avg="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out")"
  failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")"
  # Third column of the per-transaction log: latency in microseconds.
  read -r p50 p99 < <(cat "$prefix".* | awk '{ print $3 }' | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) { print "0 0"; exit }
           i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
           i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
           printf "%.2f %.2f\n", v[i50] / 1000, v[i99] / 1000 }')
  results+=("$(printf '%-44s %9.0f %-5s %9.0f ev/s %9s %9.2f %9.2f %7s' \
    "$name" "$tps" "tx/s" "$(awk -v t="$tps" -v e="$events" 'BEGIN { print t * e }')" \
    "$avg" "$p50" "$p99" "${failed:-0}")")
}

bench "pgbench: insert 1 event/tx, 1 client" 1 -c 1 -j 1 -f "$here/insert.sql"
bench "pgbench: insert 1 event/tx, 8 clients" 1 -c 8 -j 2 -f "$here/insert.sql"
bench "pgbench: insert 10 events/tx, 8 clients" 10 -c 8 -j 2 -f "$here/insert10.sql"

printf '\n%-44s %15s %14s %9s %9s %9s %7s\n' \
  "scenario" "tps" "events" "avg ms" "p50 ms" "p99 ms" "failed"
printf '%s\n' "${results[@]}"
