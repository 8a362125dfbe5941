#!/usr/bin/env bash
# Makes sure a Neo4j-compatible Bolt endpoint is running locally for the graph
# read model. Neo4j cannot be installed on the development machines, so this runs
# ArcadeDB's server with its Bolt plugin, installed from PyPI (`arcadedb-embedded`,
# which ships the jars and its own Java runtime) into .tools/arcadedb-venv; the
# data lives in .tools/arcadedb-data, the log in .run/arcadedb.log, the pid in
# .run/arcadedb.pid. Idempotent.
#
#   scripts/graph.sh up       # start ArcadeDB unless a Bolt server already answers (default)
#   scripts/graph.sh check    # report only; exit 1 if nothing speaks Bolt there
#   scripts/graph.sh down     # stop the server that `up` started (and nothing else)
#   scripts/graph.sh install  # only install ArcadeDB into .tools (the fault tests start
#                             # private servers from it); prints the package folder
#
# Environment:
#   NEURECTOMY_GRAPH_URI        bolt://127.0.0.1:7687   where clients connect
#   NEURECTOMY_GRAPH_PASSWORD   neurectomy-dev          root password (8+ characters);
#                                                       applied when the data folder is
#                                                       first created, kept afterwards
#   NEURECTOMY_GRAPH_DATABASE   neurectomy              database created at startup
#   NEURECTOMY_GRAPH_HTTP_PORT  2480 (the next free one up to 2489 if taken)
#                                                       ArcadeDB's HTTP API, on 127.0.0.1;
#                                                       the port in use is written to
#                                                       .run/arcadedb.http-port
#   NEURECTOMY_GRAPH_HEAP       1g                      JVM -Xmx
#   NEURECTOMY_GRAPH_START_TIMEOUT  90                  seconds to wait for the server
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ARCADEDB_VERSION="26.10.2.post1" # arcadedb-embedded on PyPI; logs "ArcadeDB Server v26.10.2"

GRAPH_URI="${NEURECTOMY_GRAPH_URI:-bolt://127.0.0.1:7687}"
GRAPH_PASSWORD="${NEURECTOMY_GRAPH_PASSWORD:-neurectomy-dev}"
GRAPH_DB="${NEURECTOMY_GRAPH_DATABASE:-neurectomy}"
HEAP="${NEURECTOMY_GRAPH_HEAP:-1g}"
START_TIMEOUT="${NEURECTOMY_GRAPH_START_TIMEOUT:-90}"

VENV="$ROOT/.tools/arcadedb-venv"
DATA="$ROOT/.tools/arcadedb-data"
RUN="$ROOT/.run"
LOG="$RUN/arcadedb.log"
PIDFILE="$RUN/arcadedb.pid"
HTTP_PORT_FILE="$RUN/arcadedb.http-port"

log() { printf '[graph] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# bolt://host:port[/...] -> BOLT_HOST, BOLT_PORT (also neo4j://, bolt+s://, [::1]:port).
parse_uri() {
  local rest="${GRAPH_URI#*://}"
  rest="${rest%%/*}"
  rest="${rest##*@}"
  if [[ "$rest" == \[*\]* ]]; then
    BOLT_HOST="${rest%%]*}"; BOLT_HOST="${BOLT_HOST#[}"
    rest="${rest#*]}"; BOLT_PORT="${rest#:}"
  elif [[ "$rest" == *:* ]]; then
    BOLT_HOST="${rest%%:*}"; BOLT_PORT="${rest##*:}"
  else
    BOLT_HOST="$rest"; BOLT_PORT=""
  fi
  BOLT_PORT="${BOLT_PORT:-7687}"
  [ -n "$BOLT_HOST" ] || die "no host in NEURECTOMY_GRAPH_URI=$GRAPH_URI"
  [[ "$BOLT_PORT" =~ ^[0-9]+$ ]] || die "bad port in NEURECTOMY_GRAPH_URI=$GRAPH_URI"
}

tcp_open() { # host port
  # shellcheck disable=SC2016 # expanded by the inner shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# Prints the Bolt version the server agrees to (e.g. 4.4); fails if the port does
# not answer the Bolt handshake. Offers 4.4, 4.3, 4.2, 4.1 as neo4rs 0.8 does.
bolt_version() {
  local reply
  # shellcheck disable=SC2016 # expanded by the inner shell
  reply="$(timeout 3 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "\x60\x60\xb0\x17\x00\x00\x04\x04\x00\x00\x03\x04\x00\x00\x02\x04\x00\x00\x01\x04" >&3
    head -c 4 <&3 | od -An -tu1' _ "$BOLT_HOST" "$BOLT_PORT" 2>/dev/null)" || return 1
  local zero1 zero2 minor major
  read -r zero1 zero2 minor major <<<"$reply" || true
  # A Bolt server answers 00 00 <minor> <major>, or 00 00 00 00 if it refuses all.
  [ "${zero1:-x}" = 0 ] && [ "${zero2:-x}" = 0 ] && [[ "${major:-}" =~ ^[1-9]$ ]] || return 1
  printf '%s.%s' "$major" "$minor"
}

is_local_host() {
  case "$1" in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac
}

our_pid() { # prints the pid of the server `up` started, if it is still running
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'com.arcadedb.server.ArcadeDBServer' || return 1
  printf '%s' "$pid"
}

our_bolt_port() { # the Bolt port of the server `up` started
  local pid
  pid="$(our_pid)" || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" | sed -n 's/^-Darcadedb\.bolt\.port=//p'
}

http_port_in_use() {
  if [ -f "$HTTP_PORT_FILE" ] && our_pid >/dev/null; then cat "$HTTP_PORT_FILE"; fi
}

http_ready() { # port
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/api/v1/ready")" = 204 ]
}

# 0 if root/password is accepted by the HTTP API on that port.
credentials_ok() { # port
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -u "root:$GRAPH_PASSWORD" \
    "http://127.0.0.1:$1/api/v1/server")" = 200 ]
}

pick_http_port() {
  if [ -n "${NEURECTOMY_GRAPH_HTTP_PORT:-}" ]; then
    tcp_open 127.0.0.1 "$NEURECTOMY_GRAPH_HTTP_PORT" &&
      die "NEURECTOMY_GRAPH_HTTP_PORT=$NEURECTOMY_GRAPH_HTTP_PORT is taken on 127.0.0.1"
    printf '%s' "$NEURECTOMY_GRAPH_HTTP_PORT"; return
  fi
  local port
  for port in $(seq 2480 2489); do
    if ! tcp_open 127.0.0.1 "$port"; then printf '%s' "$port"; return; fi
  done
  die "ports 2480-2489 are all taken on 127.0.0.1; set NEURECTOMY_GRAPH_HTTP_PORT"
}

package_dir() { # the installed arcadedb_embedded folder (found by path: no import)
  local dir
  for dir in "$VENV"/lib/python3*/site-packages/arcadedb_embedded; do
    if [ -d "$dir/jars" ] && [ -x "$dir/jre/bin/java" ]; then printf '%s' "$dir"; return 0; fi
  done
  return 1
}

install_arcadedb() {
  if ! ls -d "$VENV"/lib/python3*/site-packages/arcadedb_embedded-"$ARCADEDB_VERSION".dist-info \
      >/dev/null 2>&1 || ! package_dir >/dev/null; then
    command -v python3 >/dev/null || die "python3 is needed to install arcadedb-embedded"
    if [ ! -x "$VENV/bin/python" ]; then
      log "creating $VENV"
      mkdir -p "$(dirname "$VENV")"
      python3 -m venv "$VENV"
    fi
    log "installing arcadedb-embedded==$ARCADEDB_VERSION from PyPI (~70 MB, with its own JRE)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      "arcadedb-embedded==$ARCADEDB_VERSION"
  fi
  package_dir >/dev/null || die "arcadedb_embedded/jars or jre/bin/java not found under $VENV"
}

print_log_tail() {
  if [ -f "$LOG" ]; then
    log "last lines of $LOG:"
    tail -n 40 "$LOG" >&2
  fi
}

stop_pid() { # pid: SIGTERM (ArcadeDB closes its databases cleanly), SIGKILL after 30 s
  local pid="$1"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  log "ArcadeDB (pid $pid) ignored SIGTERM for 30s; killing it"
  kill -9 "$pid" 2>/dev/null || true
}

# Waits until the Bolt port answers the handshake and the HTTP API says the
# server is ready (the default database exists only from then on).
wait_ready() { # pid http_port
  local pid="$1" http_port="$2" deadline=$((SECONDS + START_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE" "$HTTP_PORT_FILE"
      print_log_tail
      die "ArcadeDB exited during startup"
    fi
    if bolt_version >/dev/null && http_ready "$http_port"; then return 0; fi
    sleep 0.5
  done
  print_log_tail
  log "stopping ArcadeDB (pid $pid)"
  stop_pid "$pid"
  rm -f "$PIDFILE" "$HTTP_PORT_FILE"
  die "ArcadeDB did not accept Bolt connections on $BOLT_HOST:$BOLT_PORT within ${START_TIMEOUT}s"
}

report_up() {
  local version="$1" http_port=""
  if [ "$(our_bolt_port || true)" = "$BOLT_PORT" ] && is_local_host "$BOLT_HOST"; then
    http_port="$(http_port_in_use)"
  fi
  if [ -n "$http_port" ]; then
    log "Bolt $version is up at bolt://$BOLT_HOST:$BOLT_PORT (ArcadeDB, pid $(our_pid), HTTP API http://127.0.0.1:$http_port, database '$GRAPH_DB')"
  else
    log "Bolt $version is up at bolt://$BOLT_HOST:$BOLT_PORT (not started by this script)"
  fi
}

up() {
  local version pid http_port
  if version="$(bolt_version)"; then report_up "$version"; return; fi
  tcp_open "$BOLT_HOST" "$BOLT_PORT" &&
    die "$BOLT_HOST:$BOLT_PORT accepts connections but does not answer the Bolt handshake"

  if pid="$(our_pid)"; then # started earlier and still booting
    [ "$(our_bolt_port)" = "$BOLT_PORT" ] ||
      die "the ArcadeDB that scripts/graph.sh started (pid $pid) serves Bolt on port $(our_bolt_port), not $BOLT_PORT; run scripts/graph.sh down first"
    log "ArcadeDB (pid $pid) is running but Bolt is not up yet; waiting"
    wait_ready "$pid" "$(cat "$HTTP_PORT_FILE")"
    report_up "$(bolt_version)"
    return
  fi
  rm -f "$PIDFILE" "$HTTP_PORT_FILE"

  is_local_host "$BOLT_HOST" ||
    die "nothing answers at $GRAPH_URI, and this script only starts servers on this machine"
  [ "${#GRAPH_PASSWORD}" -ge 8 ] || die "NEURECTOMY_GRAPH_PASSWORD must have at least 8 characters (ArcadeDB's minimum)"
  command -v curl >/dev/null || die "curl is needed"

  install_arcadedb
  local pkg bind_host
  pkg="$(package_dir)"
  http_port="$(pick_http_port)"
  bind_host="$BOLT_HOST"
  [ "$bind_host" = localhost ] && bind_host=127.0.0.1
  mkdir -p "$DATA" "$RUN"
  printf '%s\n' "$http_port" >"$HTTP_PORT_FILE"

  log "starting ArcadeDB $ARCADEDB_VERSION: Bolt on $bind_host:$BOLT_PORT, HTTP on 127.0.0.1:$http_port, data in ${DATA#"$ROOT"/}"
  printf '\n=== %s scripts/graph.sh up\n' "$(date '+%F %T')" >>"$LOG"
  # setsid: the server outlives the shell (and its process group) that ran `up`.
  # The inner shell writes its own pid, then execs java, so the pid is java's.
  (
    cd "$DATA"
    # shellcheck disable=SC2016 # expanded by the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
      "$pkg/jre/bin/java" -Xms128m -Xmx"$HEAP" -cp "$pkg/jars/*" \
      -Darcadedb.server.rootPath="$DATA" \
      -Darcadedb.server.logsDirectory="$DATA/log" \
      -Darcadedb.server.rootPassword="$GRAPH_PASSWORD" \
      -Darcadedb.server.defaultDatabases="${GRAPH_DB}[root]" \
      -Darcadedb.bolt.defaultDatabase="$GRAPH_DB" \
      -Darcadedb.server.plugins="Bolt:com.arcadedb.bolt.BoltProtocolPlugin" \
      -Darcadedb.bolt.host="$bind_host" -Darcadedb.bolt.port="$BOLT_PORT" \
      -Darcadedb.server.httpIncomingHost=127.0.0.1 \
      -Darcadedb.server.httpIncomingPort="$http_port" \
      com.arcadedb.server.ArcadeDBServer </dev/null >>"$LOG" 2>&1 &
  )
  for _ in $(seq 1 50); do [ -s "$PIDFILE" ] && break; sleep 0.1; done
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || { print_log_tail; die "ArcadeDB did not start"; }

  wait_ready "$pid" "$http_port"
  if ! credentials_ok "$http_port"; then
    stop_pid "$pid"
    rm -f "$PIDFILE" "$HTTP_PORT_FILE"
    die "ArcadeDB rejects root/NEURECTOMY_GRAPH_PASSWORD: ${DATA#"$ROOT"/} was created with another password (use that one, or remove the folder)"
  fi
  report_up "$(bolt_version)"
}

check() {
  local version
  if version="$(bolt_version)"; then report_up "$version"; return; fi
  if tcp_open "$BOLT_HOST" "$BOLT_PORT"; then
    log "$BOLT_HOST:$BOLT_PORT accepts connections but does not answer the Bolt handshake"
  else
    log "nothing listens for Bolt at $BOLT_HOST:$BOLT_PORT ($GRAPH_URI); run scripts/graph.sh up"
  fi
  return 1
}

down() {
  local pid
  if pid="$(our_pid)"; then
    log "stopping ArcadeDB (pid $pid)"
    stop_pid "$pid"
    rm -f "$PIDFILE" "$HTTP_PORT_FILE"
    log "ArcadeDB is stopped"
  else
    rm -f "$PIDFILE" "$HTTP_PORT_FILE"
    if bolt_version >/dev/null; then
      log "a Bolt server at $BOLT_HOST:$BOLT_PORT was not started by this script; leaving it alone"
    else
      log "ArcadeDB is not running"
    fi
  fi
}

parse_uri
mode="${1:-up}"
case "$mode" in
  up) up ;;
  check) check ;;
  down) down ;;
  install) install_arcadedb; package_dir; echo ;;
  *) die "usage: $0 [up|check|down|install]" ;;
esac
