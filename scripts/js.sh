#!/usr/bin/env bash
# Makes sure the JavaScript clients of the tests can run: Node.js 20+ with
# npm (Debian's nodejs and npm when there is no node; that is 20 on Debian 13,
# but 18 on Debian 12, which is refused with a message), the packages of
# tests/js/package-lock.json (`npm ci`, only when node_modules is missing or
# the lock changed since the last install) and Debian's Chromium for the
# browser tests (/usr/bin/chromium, from Debian's packages when missing).
# Idempotent; quiet when there is nothing to do. Run by scripts/test.sh.
#
#   scripts/js.sh up       # install what is missing (default)
#   scripts/js.sh check    # report only; exit 1 if something is missing
set -euo pipefail
cd "$(dirname "$0")/.."

JS_DIR=tests/js
CHROMIUM="${NEURECTOMY_TEST_CHROMIUM:-/usr/bin/chromium}"
STAMP="$JS_DIR/node_modules/.neurectomy-lock.sha256"

log() { printf '[js] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# sudo_if_needed, apt_install
. scripts/lib.sh # (the working directory is the repository)

node_ok() {
  command -v node >/dev/null && command -v npm >/dev/null || return 1
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  [ "$major" -ge 20 ]
}

lock_hash() { sha256sum "$JS_DIR/package-lock.json" | cut -d' ' -f1; }
modules_ok() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(lock_hash)" ]; }

node_check() {
  if ! command -v node >/dev/null && [ "$1" = up ]; then apt_install nodejs npm; fi
  node_ok || die "the JavaScript tests need Node.js 20 or newer with npm on PATH (found: $(node --version 2>/dev/null || echo none)); Debian 12's nodejs is 18: install Node.js 20+ from nodejs.org or NodeSource"
}

modules() {
  if modules_ok; then return; fi
  [ "$1" = check ] && { log "$JS_DIR/node_modules is missing or older than package-lock.json"; return 1; }
  log "installing $JS_DIR's packages (npm ci)"
  local out
  out="$(mktemp)"
  # --ignore-scripts: nothing downloads a browser of its own.
  if ! (cd "$JS_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) >"$out" 2>&1; then
    cat "$out" >&2
    rm -f "$out"
    die "npm ci in $JS_DIR failed"
  fi
  rm -f "$out"
  lock_hash >"$STAMP"
}

chromium() {
  if [ -x "$CHROMIUM" ]; then return; fi
  [ "$1" = check ] && { log "$CHROMIUM is missing"; return 1; }
  [ "$CHROMIUM" = /usr/bin/chromium ] || die "NEURECTOMY_TEST_CHROMIUM=$CHROMIUM does not exist"
  apt_install chromium
  [ -x "$CHROMIUM" ] || die "installing chromium did not give $CHROMIUM"
}

mode="${1:-up}"
case "$mode" in
  up|check)
    node_check "$mode"
    status=0
    modules "$mode" || status=1
    chromium "$mode" || status=1
    exit "$status" ;;
  *) die "usage: $0 [up|check]" ;;
esac
