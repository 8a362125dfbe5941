#!/usr/bin/env bash
# Rebuilds api/assets/graphiql/ (GraphiQL 3's UMD build and CSS, React 18's
# and ReactDOM 18's UMD production builds, their licences and NOTICE.md) from
# the npm registry, at the exact versions of
# scripts/graphiql-assets/package-lock.json. The output is byte-for-byte the
# same on every run, so after it `git diff api/assets/graphiql` is empty
# unless the lock changed. Needs Node.js and npm; `cargo build` needs
# neither (the files are committed and compiled in with include_bytes!).
#
#   scripts/graphiql-assets.sh
#
# To move to other versions: edit scripts/graphiql-assets/package.json, run
# `npm install --package-lock-only --ignore-scripts` in that folder, then
# this script, and commit all three.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[graphiql-assets] %s\n' "$*" >&2; }
command -v node >/dev/null && command -v npm >/dev/null \
  || { log "error: needs node and npm (Debian: apt-get install nodejs npm)"; exit 1; }

src=scripts/graphiql-assets
out=api/assets/graphiql
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cp "$src/package.json" "$src/package-lock.json" "$work/"
log "installing the locked packages from the npm registry"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
node "$src/build.mjs" "$work/node_modules" "$out"
log "wrote $out ($(du -sh "$out" | cut -f1))"
