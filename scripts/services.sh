#!/usr/bin/env bash
# Makes sure the services Neurectomy needs are installed and running locally:
# PostgreSQL (127.0.0.1:5432, trust auth for local TCP), NATS with JetStream
# (127.0.0.1:4222) and Redis (127.0.0.1:6379, nothing kept on disk). Installs them from Debian's packages when they
# are missing and starts them when they are stopped. Idempotent.
#
#   scripts/services.sh up       # install/start what is missing (default)
#   scripts/services.sh check    # report only; exit 1 if something is down
set -euo pipefail

PG_PORT="${PG_PORT:-5432}"
NATS_PORT="${NATS_PORT:-4222}"
NATS_STORE="${NATS_STORE:-/var/lib/nats-server}"
NATS_LOG="${NATS_LOG:-/var/log/nats-server.log}"
REDIS_PORT="${REDIS_PORT:-6379}"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# sudo_if_needed, apt_install
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

wait_for() { # description, seconds, command...
  local what="$1" seconds="$2"; shift 2
  for _ in $(seq 1 $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up within ${seconds}s"
}

pg_up() { pg_isready -h 127.0.0.1 -p "$PG_PORT" -q; }

nats_info() { # prints the server's INFO line
  timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT; IFS= read -r line <&3; printf '%s' \"\$line\""
}
nats_up() { nats_info | grep -q '^INFO'; }
nats_jetstream() { nats_info | grep -q '"jetstream":true'; }

postgres() {
  if command -v pg_isready >/dev/null && pg_up; then log "PostgreSQL is up on 127.0.0.1:$PG_PORT"; return; fi
  [ "$1" = check ] && { log "PostgreSQL is DOWN on 127.0.0.1:$PG_PORT"; return 1; }
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
    local fresh=1
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  if [ -n "${fresh:-}" ]; then
    # Local development only: trust local TCP connections, as the
    # development machines are configured.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sudo_if_needed sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
  log "starting PostgreSQL $version"
  sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for "PostgreSQL" 30 pg_up
  log "PostgreSQL is up on 127.0.0.1:$PG_PORT"
}

nats() {
  if nats_up; then
    nats_jetstream || die "NATS on 127.0.0.1:$NATS_PORT runs without JetStream; restart it with -js"
    log "NATS with JetStream is up on 127.0.0.1:$NATS_PORT"
    return
  fi
  [ "$1" = check ] && { log "NATS is DOWN on 127.0.0.1:$NATS_PORT"; return 1; }
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
  local bin
  bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
  sudo_if_needed mkdir -p "$NATS_STORE"
  log "starting NATS with JetStream"
  sudo_if_needed start-stop-daemon --start --oknodo --background --exec "$bin" -- \
    -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$NATS_STORE" -l "$NATS_LOG"
  wait_for "NATS" 30 nats_up
  nats_jetstream || die "NATS started without JetStream"
  log "NATS with JetStream is up on 127.0.0.1:$NATS_PORT"
}

redis_up() {
  timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT; printf 'PING\r\n' >&3; IFS= read -r line <&3; [[ \"\$line\" == +PONG* ]]"
}

redis() {
  if redis_up; then log "Redis is up on 127.0.0.1:$REDIS_PORT"; return; fi
  [ "$1" = check ] && { log "Redis is DOWN on 127.0.0.1:$REDIS_PORT"; return 1; }
  command -v redis-server >/dev/null || apt_install redis-server
  sudo_if_needed mkdir -p /var/lib/redis /var/log/redis
  log "starting Redis"
  sudo_if_needed redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for "Redis" 30 redis_up
  log "Redis is up on 127.0.0.1:$REDIS_PORT"
}

mode="${1:-up}"
case "$mode" in
  up|check)
    status=0
    postgres "$mode" || status=1
    nats "$mode" || status=1
    redis "$mode" || status=1
    exit "$status" ;;
  *) die "usage: $0 [up|check]" ;;
esac
