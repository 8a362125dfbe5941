#!/usr/bin/env bash
# Regenerates api/link/neurectomy.order, the order in which the release
# link lays out functions (see api/build.rs): the functions the API process
# runs from start-up through `neurectomy-bench api`'s warm-up (20 × /healthz
# and agent(id)), most-run first, as callgrind saw them.
#
# Needs valgrind and the services `neurectomy-bench api` needs (PostgreSQL,
# NATS, Redis, the graph server). Run it after changes that move a lot of
# code (a dependency upgrade, a new compiler); a stale file only costs
# locality.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "link-order: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
# Built on its own: built together with the bench, cargo would unify
# features (the bench enables the test kits), so the binary measured here
# would not be the one `cargo build --release -p neurectomy-api` links, and
# LTO's numbered local symbols would not match the file.
cargo build --release -p neurectomy-api
cargo build --release -p neurectomy-bench
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/release/neurectomy"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/serve" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.out" "$bin" "\$@"
WRAP
chmod +x "$work/serve"
"$target/release/neurectomy-bench" api --only none --neurectomy "$work/serve"
test -s "$work/callgrind.out" || { echo "link-order: callgrind wrote nothing" >&2; exit 1; }
python3 scripts/link-order.py "$work/callgrind.out" "$bin" api/link/neurectomy.order
